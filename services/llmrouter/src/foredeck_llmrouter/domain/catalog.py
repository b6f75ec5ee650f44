"""The configured providers and models, and how a requested name resolves to one of them.

Names resolve in this order: a configured model name, a configured alias, then a name pattern
for a provider with credentials (``claude-*`` to Anthropic; ``gpt-*`` and ``o<digit>*`` to
OpenAI) which passes the name through as the provider's model id.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from foredeck_llmrouter.domain.errors import RouterError

_KNOWN_MODELS_LIMIT = 2048


class ProviderKind(enum.Enum):
    """The API a provider speaks."""

    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    OPENAI_COMPATIBLE = "openai_compatible"
    LOCAL = "local"


class ModelKind(enum.Enum):
    """What a model produces."""

    CHAT = "chat"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class Capabilities:
    """What a model can do; requests needing more fail before any provider call."""

    tools: bool = False
    streaming: bool = False
    vision: bool = False
    json_schema: bool = False
    json_object: bool = False
    prompt_caching: bool = False
    parallel_tool_calls: bool = False
    embedding_dimensions: bool = False


@dataclass(frozen=True)
class Pricing:
    """Micro-USD per million tokens."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0


@dataclass(frozen=True)
class ProviderSpec:
    """A configured provider."""

    name: str
    kind: ProviderKind
    credentials_configured: bool
    base_url: str = ""

    @property
    def gen_ai_system(self) -> str:
        """The OpenTelemetry GenAI ``gen_ai.system`` value."""
        return {
            ProviderKind.ANTHROPIC: "anthropic",
            ProviderKind.OPENAI: "openai",
            ProviderKind.OPENAI_COMPATIBLE: "openai",
            ProviderKind.LOCAL: "llama_cpp",
        }[self.kind]


@dataclass(frozen=True)
class ModelSpec:
    """A configured model."""

    name: str
    provider: str
    provider_model: str
    kind: ModelKind = ModelKind.CHAT
    aliases: tuple[str, ...] = ()
    context_window_tokens: int = 8192
    max_output_tokens: int = 4096
    capabilities: Capabilities = Capabilities()
    pricing: Pricing = Pricing()
    fallback_models: tuple[str, ...] = ()
    embedding_dimensions: int = 0


_PATTERNS: tuple[tuple[re.Pattern[str], ProviderKind], ...] = (
    (re.compile(r"claude-[A-Za-z0-9.\-]+"), ProviderKind.ANTHROPIC),
    (re.compile(r"(gpt-[A-Za-z0-9.\-]+|o[0-9][A-Za-z0-9.\-]*)"), ProviderKind.OPENAI),
)

_PATTERN_CAPABILITIES = {
    ProviderKind.ANTHROPIC: Capabilities(
        tools=True,
        streaming=True,
        vision=True,
        json_schema=True,
        json_object=True,
        prompt_caching=True,
        parallel_tool_calls=True,
    ),
    ProviderKind.OPENAI: Capabilities(
        tools=True,
        streaming=True,
        vision=True,
        json_schema=True,
        json_object=True,
        parallel_tool_calls=True,
    ),
}


@dataclass
class Catalog:
    """Providers, models, aliases and defaults, as configured."""

    providers: dict[str, ProviderSpec]
    models: dict[str, ModelSpec]
    default_model: str = ""
    default_embedding_model: str = ""
    tenant_default_models: dict[str, str] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for model in self.models.values():
            if model.provider not in self.providers:
                raise ValueError(f"model {model.name!r} names unknown provider {model.provider!r}")
            for alias in model.aliases:
                if alias in self.models or alias in self._aliases:
                    raise ValueError(f"alias {alias!r} is used twice")
                self._aliases[alias] = model.name

    def provider(self, name: str) -> ProviderSpec:
        """The provider by name; NOT_FOUND `PROVIDER_NOT_FOUND` when unknown."""
        try:
            return self.providers[name]
        except KeyError:
            raise RouterError(
                "PROVIDER_NOT_FOUND",
                "provider not configured",
                metadata={"provider": name, "knownProviders": ",".join(sorted(self.providers))},
            ) from None

    def aliases_of(self, name: str) -> list[str]:
        """The aliases that point at a model."""
        return sorted(a for a, target in self._aliases.items() if target == name)

    def is_default(self, name: str) -> bool:
        """Whether the model is a router-wide default."""
        return name in (self.default_model, self.default_embedding_model)

    def resolve(self, requested: str, kind: ModelKind, tenant_id: str = "") -> ModelSpec:
        """The model a request names (or the tenant's default when it names none)."""
        name = requested
        if not name:
            name = (
                self.tenant_default_models.get(tenant_id, "") or self.default_model
                if kind is ModelKind.CHAT
                else self.default_embedding_model
            )
        model = self.models.get(name) or self.models.get(self._aliases.get(name, ""))
        if model is None:
            model = self._by_pattern(name)
        if model is None or model.kind is not kind:
            if model is not None:
                raise RouterError(
                    "MODEL_CAPABILITY_UNSUPPORTED",
                    "model cannot serve this request",
                    metadata={
                        "model": model.name,
                        "capability": "chat" if kind is ModelKind.CHAT else "embeddings",
                    },
                    field_violations=[("model", f"not a {kind.value} model")],
                )
            raise RouterError(
                "MODEL_NOT_FOUND",
                "model not configured",
                metadata={"model": requested, "knownModels": self.known_names(kind)},
            )
        return model

    def _by_pattern(self, name: str) -> ModelSpec | None:
        for pattern, kind in _PATTERNS:
            if not pattern.fullmatch(name):
                continue
            for provider in self.providers.values():
                if provider.kind is kind and provider.credentials_configured:
                    return ModelSpec(
                        name=name,
                        provider=provider.name,
                        provider_model=name,
                        context_window_tokens=128_000,
                        max_output_tokens=8192,
                        capabilities=_PATTERN_CAPABILITIES[kind],
                    )
        return None

    def known_names(self, kind: ModelKind) -> str:
        """Configured names and aliases of one kind, comma-separated, cut at 2 KiB at a comma."""
        names = sorted(
            [m.name for m in self.models.values() if m.kind is kind]
            + [a for a, t in self._aliases.items() if self.models[t].kind is kind]
        )
        text = ",".join(names)
        if len(text) > _KNOWN_MODELS_LIMIT:
            text = text[: text.rfind(",", 0, _KNOWN_MODELS_LIMIT + 1)]
        return text

    def chain(
        self, first: ModelSpec, requested_fallbacks: Iterable[str], disable: bool
    ) -> list[ModelSpec]:
        """The models to try in order: the first, then its fallbacks, without repeats."""
        chain = [first]
        if disable:
            return chain
        names = list(requested_fallbacks) or list(first.fallback_models)
        for name in names:
            model = self.resolve(name, first.kind)
            if all(m.name != model.name for m in chain):
                chain.append(model)
        return chain


def with_overrides(model: ModelSpec, overrides: Mapping[str, object]) -> ModelSpec:
    """A copy of a model with some fields replaced (used by configuration)."""
    return replace(model, **overrides)  # type: ignore[arg-type]
