"""The router's settings: providers, models, defaults, retries and circuit breakers."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from foredeck_kit.settings import ServiceSettings


class PricingConfig(BaseModel):
    """Micro-USD per million tokens."""

    input: int = Field(default=0, ge=0)
    output: int = Field(default=0, ge=0)
    cache_read: int = Field(default=0, ge=0)
    cache_write: int = Field(default=0, ge=0)


class CapabilitiesConfig(BaseModel):
    """What a model can do."""

    tools: bool = False
    streaming: bool = True
    vision: bool = False
    json_schema: bool = False
    json_object: bool = False
    prompt_caching: bool = False
    parallel_tool_calls: bool = False
    embedding_dimensions: bool = False


class ModelConfig(BaseModel):
    """One model as configured; a configured name replaces a built-in one of the same name."""

    name: str = Field(min_length=1, max_length=128)
    provider: str = Field(min_length=1, max_length=64)
    provider_model: str = ""
    """The id sent to the provider; defaults to ``name``."""
    kind: Literal["chat", "embedding"] = "chat"
    aliases: list[str] = Field(default_factory=list)
    context_window_tokens: int = Field(default=8192, gt=0)
    max_output_tokens: int = Field(default=4096, gt=0)
    capabilities: CapabilitiesConfig = Field(default_factory=CapabilitiesConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    fallback_models: list[str] = Field(default_factory=list)
    embedding_dimensions: int = Field(default=0, ge=0)


class ProviderConfig(BaseModel):
    """An extra provider, typically an OpenAI-compatible self-hosted server (vLLM, Ollama…)."""

    name: str = Field(pattern=r"^[a-z0-9-]{1,64}$")
    kind: Literal["openai_compatible", "openai", "anthropic"] = "openai_compatible"
    base_url: str = Field(min_length=1)
    api_key: SecretStr = SecretStr("")
    """Self-hosted servers often need none; the SDK is then given a placeholder."""


class LlmRouterSettings(ServiceSettings):
    """Settings of the llmrouter service, read from ``FOREDECK_LLMROUTER_*`` variables."""

    model_config = SettingsConfigDict(
        env_prefix="FOREDECK_LLMROUTER_", frozen=True, populate_by_name=True
    )

    service_name: str = "llmrouter"
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis holding the circuit breakers shared by every replica.",
    )

    anthropic_api_key: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices("FOREDECK_LLMROUTER_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
    )
    anthropic_base_url: str = Field(
        default="",
        validation_alias=AliasChoices(
            "FOREDECK_LLMROUTER_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL"
        ),
    )
    openai_api_key: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices("FOREDECK_LLMROUTER_OPENAI_API_KEY", "OPENAI_API_KEY"),
    )
    openai_base_url: str = Field(
        default="",
        validation_alias=AliasChoices("FOREDECK_LLMROUTER_OPENAI_BASE_URL", "OPENAI_BASE_URL"),
    )
    providers: list[ProviderConfig] = Field(
        default_factory=list, description="Extra providers (JSON list)."
    )
    models: list[ModelConfig] = Field(
        default_factory=list, description="Extra or replacement models (JSON list)."
    )
    builtin_models: bool = Field(
        default=True, description="Include the built-in Anthropic, OpenAI and local models."
    )

    local_enabled: bool = True
    local_model_path: str = Field(default="", description="GGUF file; empty: the bundled one.")
    local_context_tokens: int = Field(default=2048, ge=256)
    local_threads: int = Field(default=2, ge=1)
    local_queue_limit: int = Field(default=8, ge=0)
    local_embeddings_enabled: bool = True

    default_model: str = Field(
        default="",
        description="Model for requests naming none; empty: Anthropic, else OpenAI, else local.",
    )
    default_embedding_model: str = ""
    tenant_default_models: dict[str, str] = Field(
        default_factory=dict, description="Per-tenant default model (JSON object)."
    )

    retry_max_attempts: int = Field(default=3, ge=1, le=10)
    retry_base_delay_seconds: float = Field(default=0.5, ge=0)
    retry_max_delay_seconds: float = Field(default=8.0, ge=0)
    retry_max_retry_after_seconds: float = Field(default=30.0, ge=0)
    attempt_timeout_seconds: float = Field(default=60.0, gt=0)

    response_retention_seconds: float = Field(
        default=24 * 3600, gt=0, description="How long a Generate answer is kept by request id."
    )

    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_failure_window_seconds: float = Field(default=30.0, gt=0)
    circuit_cooldown_seconds: float = Field(default=15.0, gt=0)
    circuit_probe_timeout_seconds: float = Field(default=60.0, gt=0)
