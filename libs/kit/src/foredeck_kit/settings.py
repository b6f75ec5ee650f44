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

from datetime import timedelta
from typing import TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from foredeck_kit.logs import LogFormat, LogLevel
from foredeck_kit.principal import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
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
    log_level: LogLevel = Field(
        default="info", description="debug, info, warning, error or critical."
    )
    log_format: LogFormat = Field(
        default="json", description="json (one object per line) or console."
    )

    def principal_verifier(self) -> PrincipalVerifier:
        """Build the verifier for inbound principals; fails when no keys are configured."""
        spec = self.principal_keys.get_secret_value()
        if not spec:
            raise SettingsError(
                f"{self.model_config.get('env_prefix', '')}PRINCIPAL_KEYS is required"
            )
        try:
            keys = parse_keys(spec)
        except ValueError as exc:
            raise SettingsError(f"principal_keys: {exc}") from None
        return PrincipalVerifier(
            keys,
            issuer=self.principal_issuer,
            audience=self.principal_audience,
            leeway=timedelta(seconds=self.principal_leeway_seconds),
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
