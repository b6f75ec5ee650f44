"""Settings of the gateway, read once in ``main()`` from ``FOREDECK_GATEWAY_*``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from foredeck_kit.settings import ServiceSettings

__all__ = ["GatewaySettings"]

_ROUTE_NAME = r"^[A-Za-z]+$"


class GatewaySettings(ServiceSettings):
    """Where the gateway's state and its orchestrator live, how callers authenticate, and the
    defaults of rate limits, concurrency and budget reservations."""

    model_config = SettingsConfigDict(env_prefix="FOREDECK_GATEWAY_")

    service_name: str = "gateway"
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis holding API keys, budgets, rate limits and reservations.",
    )
    key_prefix: str = Field(
        default="gw",
        pattern=r"^[a-zA-Z0-9_.-]{1,32}$",
        description="Prefix of every Redis key the gateway writes.",
    )
    redis_timeout_seconds: float = Field(
        default=0.25,
        gt=0,
        le=10,
        description="Longest a Redis round trip may take before the route fails open or closed.",
    )
    redis_max_connections: int = Field(
        default=64, ge=1, le=10_000, description="Most Redis connections a replica opens."
    )
    orchestrator_address: str = Field(
        default="127.0.0.1:50051",
        description="host:port of the orchestrator's RunService and AgentService.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Directory of the bootstrap credentials file (admin key and developer key, "
        "mode 0600), written on first start; unset: no bootstrap.",
    )
    bootstrap_tenant: str = Field(
        default="local", description="Tenant of the developer key the bootstrap creates."
    )
    bootstrap_user: str = Field(
        default="developer", description="User of the developer key the bootstrap creates."
    )
    admin_key_hashes: str = Field(
        default="",
        description="Comma-separated SHA-256 hex digests of admin API keys accepted without "
        "Redis: the operator's out-of-band admin credential.",
    )
    admin_tenant: str = Field(
        default="platform", description="Tenant named in the principal of an admin credential."
    )
    jwt_hs256_secrets: SecretStr = Field(
        default=SecretStr(""),
        description="HS256 secrets of identity providers as 'kid:secret,kid2:secret2' "
        "(secrets of at least 32 bytes).",
    )
    jwt_public_keys_file: Path | None = Field(
        default=None,
        description="JSON object {kid: PEM} of RS256 public keys of identity providers.",
    )
    jwks_file: Path | None = Field(
        default=None, description="A JWKS document (RFC 7517) with RS256 public keys."
    )
    jwt_issuer: str = Field(default="", description="Required `iss` of JWTs; empty: any.")
    jwt_audience: str = Field(default="", description="Required `aud` of JWTs; empty: none.")
    jwt_leeway_seconds: float = Field(
        default=30.0, ge=0, le=300, description="Clock skew tolerated on exp and nbf."
    )
    jwt_tenant_claim: str = Field(default="tid", description="Claim holding the tenant id.")
    jwt_permissions_claim: str = Field(
        default="scope",
        description="Claim holding the permissions: a space-separated string or a list.",
    )
    default_key_requests_per_minute: int = Field(default=600, ge=1, le=1_000_000)
    default_user_requests_per_minute: int = Field(default=1200, ge=1, le=1_000_000)
    default_tenant_requests_per_minute: int = Field(default=6000, ge=1, le=1_000_000)
    default_max_concurrent_runs: int = Field(default=10, ge=1, le=10_000)
    default_run_tokens: int = Field(
        default=100_000,
        ge=1,
        description="Tokens reserved for a run without a token cap while a budget limits tokens.",
    )
    default_run_cost_usd_micros: int = Field(
        default=1_000_000,
        ge=1,
        description="Cost reserved for a run without a cost cap while a budget limits cost.",
    )
    fail_open_routes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "GetRun",
            "ListRuns",
            "GetRunTree",
            "WatchRun",
            "ListApprovals",
            "GetRunJournal",
            "GetAgent",
            "ListAgents",
            "ListAgentVersions",
            "WhoAmI",
        ],
        description="GatewayService methods admitted unchecked while Redis is unreachable (JSON "
        "list or comma-separated); every other route fails closed with RATE_LIMITER_UNAVAILABLE.",
    )
    principal_ttl_seconds: int = Field(
        default=300, ge=10, le=900, description="Lifetime of the principals the gateway mints."
    )
    reservation_lease_seconds: int = Field(
        default=120,
        ge=5,
        description="How long a reservation stays without a check of its run; the settler "
        "extends it while the run is alive and releases it once the run is gone.",
    )
    submit_grace_seconds: int = Field(
        default=300,
        ge=5,
        description="How long a reservation whose submission outcome is unknown is held before "
        "it is released.",
    )
    watch_runs: bool = Field(
        default=True,
        description="Follow each admitted run's events to settle its reservation as soon as it "
        "finishes; off: the sweeper settles it at the run's next check "
        "(reservation_lease_seconds), for less work per run.",
    )
    settle_interval_seconds: float = Field(
        default=2.0, gt=0, description="How often the settler looks for reservations due."
    )
    api_key_cache_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long a key seen valid may still authenticate a fail-open route while "
        "Redis is unreachable; 0 disables it.",
    )

    @field_validator("fail_open_routes", mode="before")
    @classmethod
    def _split_routes(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("fail_open_routes")
    @classmethod
    def _check_routes(cls, value: list[str]) -> list[str]:
        import re

        for route in value:
            if not re.fullmatch(_ROUTE_NAME, route):
                raise ValueError(f"route {route!r} is not a method name")
        return value

    def admin_hashes(self) -> frozenset[str]:
        """The configured admin key digests, lower-case."""
        return frozenset(
            item.strip().lower() for item in self.admin_key_hashes.split(",") if item.strip()
        )
