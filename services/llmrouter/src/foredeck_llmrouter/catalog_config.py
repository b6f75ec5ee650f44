"""The built-in model table and the catalog the settings describe.

Built-in entries are listed only for providers that exist: Anthropic and OpenAI always (their
models are listed, and callable once a key is set), the local models when enabled. Configured
models replace built-in ones of the same name.
"""

from __future__ import annotations

from foredeck_llmrouter.config import (
    CapabilitiesConfig,
    LlmRouterSettings,
    ModelConfig,
    PricingConfig,
)
from foredeck_llmrouter.domain.catalog import (
    Capabilities,
    Catalog,
    ModelKind,
    ModelSpec,
    Pricing,
    ProviderKind,
    ProviderSpec,
)

LOCAL_PROVIDER = "local"
LOCAL_CHAT_MODEL = "smollm2-135m-instruct"
LOCAL_EMBEDDING_MODEL = "all-minilm-l6-v2"

_CLAUDE = CapabilitiesConfig(
    tools=True,
    streaming=True,
    vision=True,
    json_schema=True,
    json_object=True,
    prompt_caching=True,
    parallel_tool_calls=True,
)
_GPT = CapabilitiesConfig(
    tools=True,
    streaming=True,
    vision=True,
    json_schema=True,
    json_object=True,
    prompt_caching=True,
    parallel_tool_calls=True,
)


def builtin_models(settings: LlmRouterSettings) -> list[ModelConfig]:
    """The models the router knows without configuration (prices in micro-USD per million)."""
    models = [
        ModelConfig(
            name="claude-sonnet-4-6",
            provider="anthropic",
            aliases=["sonnet"],
            context_window_tokens=200_000,
            max_output_tokens=64_000,
            capabilities=_CLAUDE,
            pricing=PricingConfig(
                input=3_000_000, output=15_000_000, cache_read=300_000, cache_write=3_750_000
            ),
        ),
        ModelConfig(
            name="claude-haiku-4-5",
            provider="anthropic",
            aliases=["haiku"],
            context_window_tokens=200_000,
            max_output_tokens=64_000,
            capabilities=_CLAUDE,
            pricing=PricingConfig(
                input=1_000_000, output=5_000_000, cache_read=100_000, cache_write=1_250_000
            ),
        ),
        ModelConfig(
            name="gpt-4o",
            provider="openai",
            context_window_tokens=128_000,
            max_output_tokens=16_384,
            capabilities=_GPT,
            pricing=PricingConfig(input=2_500_000, output=10_000_000, cache_read=1_250_000),
        ),
        ModelConfig(
            name="gpt-4o-mini",
            provider="openai",
            context_window_tokens=128_000,
            max_output_tokens=16_384,
            capabilities=_GPT,
            pricing=PricingConfig(input=150_000, output=600_000, cache_read=75_000),
        ),
        ModelConfig(
            name="text-embedding-3-small",
            provider="openai",
            kind="embedding",
            context_window_tokens=8191,
            max_output_tokens=1,
            capabilities=CapabilitiesConfig(streaming=False, embedding_dimensions=True),
            pricing=PricingConfig(input=20_000),
            embedding_dimensions=1536,
        ),
    ]
    if settings.local_enabled:
        models.append(
            ModelConfig(
                name=LOCAL_CHAT_MODEL,
                provider=LOCAL_PROVIDER,
                aliases=["local", "smollm2"],
                context_window_tokens=settings.local_context_tokens,
                max_output_tokens=min(1024, settings.local_context_tokens // 2),
                capabilities=CapabilitiesConfig(streaming=True, json_schema=True, json_object=True),
            )
        )
    if settings.local_embeddings_enabled:
        models.append(
            ModelConfig(
                name=LOCAL_EMBEDDING_MODEL,
                provider=LOCAL_PROVIDER,
                aliases=["local-embedding", "minilm"],
                kind="embedding",
                context_window_tokens=256,
                max_output_tokens=1,
                capabilities=CapabilitiesConfig(streaming=False),
                embedding_dimensions=384,
            )
        )
    return models


def build_providers(settings: LlmRouterSettings) -> dict[str, ProviderSpec]:
    """Every provider the settings describe."""
    providers = {
        "anthropic": ProviderSpec(
            "anthropic",
            ProviderKind.ANTHROPIC,
            bool(settings.anthropic_api_key.get_secret_value()),
            settings.anthropic_base_url,
        ),
        "openai": ProviderSpec(
            "openai",
            ProviderKind.OPENAI,
            bool(settings.openai_api_key.get_secret_value()),
            settings.openai_base_url,
        ),
    }
    if settings.local_enabled or settings.local_embeddings_enabled:
        providers[LOCAL_PROVIDER] = ProviderSpec(LOCAL_PROVIDER, ProviderKind.LOCAL, True)
    for extra in settings.providers:
        kind = ProviderKind(extra.kind)
        # Self-hosted servers usually need no key; they count as having credentials.
        credentials = kind is ProviderKind.OPENAI_COMPATIBLE or bool(
            extra.api_key.get_secret_value()
        )
        providers[extra.name] = ProviderSpec(extra.name, kind, credentials, extra.base_url)
    return providers


def _spec(config: ModelConfig) -> ModelSpec:
    caps = config.capabilities
    price = config.pricing
    return ModelSpec(
        name=config.name,
        provider=config.provider,
        provider_model=config.provider_model or config.name,
        kind=ModelKind(config.kind),
        aliases=tuple(config.aliases),
        context_window_tokens=config.context_window_tokens,
        max_output_tokens=config.max_output_tokens,
        capabilities=Capabilities(**caps.model_dump()),
        pricing=Pricing(price.input, price.output, price.cache_read, price.cache_write),
        fallback_models=tuple(config.fallback_models),
        embedding_dimensions=config.embedding_dimensions,
    )


def build_catalog(settings: LlmRouterSettings) -> Catalog:
    """The catalog: providers, built-in and configured models, and defaults."""
    providers = build_providers(settings)
    configs = {m.name: m for m in builtin_models(settings)} if settings.builtin_models else {}
    for model in settings.models:
        configs[model.name] = model
    models = {name: _spec(config) for name, config in configs.items()}
    default = settings.default_model
    if not default:
        if providers["anthropic"].credentials_configured and "claude-sonnet-4-6" in models:
            default = "claude-sonnet-4-6"
        elif providers["openai"].credentials_configured and "gpt-4o-mini" in models:
            default = "gpt-4o-mini"
        elif LOCAL_CHAT_MODEL in models:
            default = LOCAL_CHAT_MODEL
    embedding_default = settings.default_embedding_model
    if not embedding_default:
        if providers["openai"].credentials_configured and "text-embedding-3-small" in models:
            embedding_default = "text-embedding-3-small"
        elif LOCAL_EMBEDDING_MODEL in models:
            embedding_default = LOCAL_EMBEDDING_MODEL
    return Catalog(
        providers=providers,
        models=models,
        default_model=default,
        default_embedding_model=embedding_default,
        tenant_default_models=dict(settings.tenant_default_models),
    )
