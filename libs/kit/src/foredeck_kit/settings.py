"""Settings every Foredeck service shares, read from the environment once, in ``main()``.

Each service subclasses :class:`ServiceSettings` with its own prefix::

    class MemorySettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="FOREDECK_MEMORY_")

        service_name: str = "memory"
        redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis for state.")

    settings = load_settings(MemorySettings)  # reads FOREDECK_MEMORY_PORT, ...

Nothing here reads the environment at import time.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta
from typing import TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from foredeck_kit.approval import ApprovalTokenSigner, ApprovalTokenVerifier
from foredeck_kit.delegation import DelegationSigner
from foredeck_kit.errors import Reason
from foredeck_kit.logs import LogFormat, LogLevel
from foredeck_kit.principal import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    DEFAULT_MAX_LIFETIME,
    PrincipalVerifier,
    parse_keys,
)

__all__ = ["ServiceSettings", "SettingsError", "load_settings"]

MIB = 1024 * 1024

S = TypeVar("S", bound="ServiceSettings")


class SettingsError(ValueError):
    """The environment does not describe a valid configuration; the message lists each field."""


class ServiceSettings(BaseSettings):
    """Server, telemetry and identity settings common to every service."""

    model_config = SettingsConfigDict(
        env_prefix="FOREDECK_",
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    service_name: str = Field(
        default="foredeck",
        description="Name used in logs, traces (service.name) and the error domain.",
    )
    host: str = Field(default="127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_host: str = Field(
        default="127.0.0.1", description="Address of the Prometheus endpoint."
    )
    metrics_port: int = Field(
        default=0,
        ge=-1,
        le=65535,
        description="Prometheus port; 0 picks a free port, -1 disables it.",
    )
    grace_period_seconds: float = Field(
        default=10.0, ge=0, description="How long in-flight RPCs may run on after stop begins."
    )
    drain_seconds: float = Field(
        default=0.0,
        ge=0,
        description="How long NOT_SERVING is shown before the server stops accepting calls, so "
        "load balancers stop routing first (a few seconds in a cluster, 0 in development).",
    )
    max_message_bytes: int = Field(
        default=4 * MIB,
        ge=1024,
        description="Largest message the server sends or accepts, in bytes.",
    )
    keepalive_time_ms: int = Field(
        default=30_000,
        ge=1000,
        description="Interval of server keepalive pings on idle connections.",
    )
    keepalive_timeout_ms: int = Field(
        default=10_000, ge=100, description="How long a keepalive ping may go unanswered."
    )
    keepalive_min_ping_interval_ms: int = Field(
        default=10_000,
        ge=0,
        description="Shortest interval between client pings the server tolerates.",
    )
    max_connection_idle_ms: int = Field(
        default=0, ge=0, description="Close connections idle this long; 0 keeps them."
    )
    max_connection_age_ms: int = Field(
        default=0,
        ge=0,
        description="Close connections this old so clients rebalance across replicas; 0 never.",
    )
    default_call_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Timeout of outbound calls that set none themselves."
    )
    principal_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Principal signing keys as 'kid:secret,kid2:secret2' (secrets >= 32 bytes).",
    )
    principal_issuer: str = Field(default=DEFAULT_ISSUER, description="Expected principal issuer.")
    principal_audience: str = Field(
        default=DEFAULT_AUDIENCE, description="Expected principal audience."
    )
    principal_leeway_seconds: float = Field(
        default=5.0, ge=0, description="Clock skew tolerated when checking principal expiry."
    )
    principal_max_lifetime_seconds: float = Field(
        default=DEFAULT_MAX_LIFETIME.total_seconds(),
        ge=1,
        description="Longest lifetime (exp - iat) of a principal accepted, in seconds.",
    )
    delegation_keys: SecretStr = Field(
        default=SecretStr(""),
        description="The orchestrator's keys for delegated principals and approval tokens, "
        "'kid:secret,...' with key ids distinct from the principal keys; the first signs. "
        "Empty: delegated principals are refused.",
    )
    log_level: LogLevel = Field(
        default="info", description="debug, info, warning, error or critical (any case)."
    )
    log_format: LogFormat = Field(
        default="json", description="json (one object per line) or console."
    )
    trace_sample_ratio: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Share of new traces recorded (parent-based: a call follows its caller's "
        "decision); ignored when OTEL_TRACES_SAMPLER is set.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    def _env(self, name: str) -> str:
        return f"{self.model_config.get('env_prefix', '')}{name.upper()}"

    def _keys(self, name: str) -> dict[str, bytes] | None:
        secret: SecretStr = getattr(self, name)
        spec = secret.get_secret_value()
        if not spec:
            return None
        try:
            return parse_keys(spec)
        except ValueError as exc:
            raise SettingsError(f"{self._env(name)}: {exc}") from None

    def _delegation_keys(self) -> dict[str, bytes]:
        keys = self._keys("delegation_keys")
        if keys is None:
            raise SettingsError(f"{self._env('delegation_keys')} is required")
        principal_keys = self._keys("principal_keys") or {}
        shared = sorted(keys.keys() & principal_keys.keys())
        if shared:
            raise SettingsError(
                f"{self._env('delegation_keys')}: key ids {shared} are also principal key ids; "
                "each issuer needs key ids of its own"
            )
        return keys

    def principal_verifier(
        self, *, gateway_only_methods: Collection[str] = ()
    ) -> PrincipalVerifier:
        """Build the verifier for inbound principals; fails when no keys are configured.

        It accepts the gateway's principals (``principal_keys``) and, when ``delegation_keys``
        is set, the orchestrator's delegated ones, except on ``gateway_only_methods``.
        """
        keys = self._keys("principal_keys")
        if keys is None:
            raise SettingsError(f"{self._env('principal_keys')} is required")
        delegation = self._delegation_keys() if self.delegation_keys.get_secret_value() else None
        return PrincipalVerifier(
            keys,
            issuer=self.principal_issuer,
            audience=self.principal_audience,
            leeway=timedelta(seconds=self.principal_leeway_seconds),
            max_lifetime=timedelta(seconds=self.principal_max_lifetime_seconds),
            delegation_keys=delegation,
            gateway_only_methods=gateway_only_methods,
        )

    def delegation_signer(self) -> DelegationSigner:
        """Build the orchestrator's signer of delegated principals (first delegation key)."""
        keys = self._delegation_keys()
        return DelegationSigner(
            keys,
            next(iter(keys)),
            audience=self.principal_audience,
            max_lifetime=timedelta(seconds=self.principal_max_lifetime_seconds),
        )

    def approval_signer(self) -> ApprovalTokenSigner:
        """Build the orchestrator's signer of approval tokens (first delegation key)."""
        keys = self._delegation_keys()
        return ApprovalTokenSigner(keys, next(iter(keys)))

    def approval_verifier(
        self, *, reason: str = Reason.PERMISSION_MISSING
    ) -> ApprovalTokenVerifier:
        """Build the toolrunner's verifier of approval tokens from the delegation keys."""
        return ApprovalTokenVerifier(
            self._delegation_keys(),
            leeway=timedelta(seconds=self.principal_leeway_seconds),
            reason=reason,
        )


def load_settings(cls: type[S]) -> S:
    """Build ``cls`` from the environment, turning validation errors into one readable error.

    The message names each environment variable at fault and never echoes secret values.
    """
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = [
            f"{prefix}{'_'.join(str(part) for part in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_input=False)
        ]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
