"""``build_server(settings)``: the factory both ``main()`` and the tests use.

Redis, the orchestrator's channel, the admission gate and the settler are built when the host
starts, inside its event loop, and closed after it stops. Health is SERVING while Redis answers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from foredeck.orchestrator.v1 import orchestrator_service_pb2
from foredeck_gateway.admission import AdmissionMetrics, Gate
from foredeck_gateway.bootstrap import ensure_credentials
from foredeck_gateway.clients import Orchestrator
from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.credentials import JwtVerifier
from foredeck_gateway.errors import DOMAIN
from foredeck_gateway.servicer import AdminServicer, GatewayServicer
from foredeck_gateway.settlement import Settler
from foredeck_gateway.store import RedisState, StoreDown
from foredeck_kit.channels import idempotent_methods, open_channel
from foredeck_kit.logs import get_logger
from foredeck_kit.principal import PrincipalSigner, generate_key, parse_keys
from foredeck_kit.server import ServiceHost
from foredeck_kit.settings import SettingsError
from foredeck_kit.telemetry import Telemetry

__all__ = ["SERVICE_NAMES", "GatewayHost", "build_server"]

SERVICE_NAMES = ("foredeck.gateway.v1.GatewayService", "foredeck.gateway.v1.AdminService")


class GatewayHost(ServiceHost):
    """The kit's host plus the gateway's Redis, orchestrator channel, gate and settler."""

    def __init__(self, settings: GatewaySettings, **kwargs: Any) -> None:
        super().__init__(
            settings,
            domain=DOMAIN,
            register=self._register_servicers,
            service_names=SERVICE_NAMES,
            verifier=None,
            readiness=self._readiness_check,
            **kwargs,
        )
        self.gateway_settings = settings
        self.redis: Redis | None = None
        self.state: RedisState | None = None
        self.gate: Gate | None = None
        self.settler: Settler | None = None
        self.orchestrator: Orchestrator | None = None
        self.admission_metrics = AdmissionMetrics(self.metrics.registry)
        self._channel: grpc.aio.Channel | None = None
        self._gateway: GatewayServicer | None = None
        self._admin: AdminServicer | None = None

    def _register_servicers(self, server: grpc.aio.Server) -> None:
        assert self._gateway is not None
        assert self._admin is not None
        gw_grpc.add_GatewayServiceServicer_to_server(self._gateway, server)
        gw_grpc.add_AdminServiceServicer_to_server(self._admin, server)

    async def _readiness_check(self) -> bool:
        assert self.state is not None
        try:
            return await self.state.ping()
        except StoreDown:
            return False

    def _signer(self) -> PrincipalSigner:
        s = self.gateway_settings
        spec = s.principal_keys.get_secret_value()
        if not spec:
            raise SettingsError("FOREDECK_GATEWAY_PRINCIPAL_KEYS is required")
        keys = parse_keys(spec)
        return PrincipalSigner(
            keys,
            next(iter(keys)),
            issuer=s.principal_issuer,
            audience=s.principal_audience,
            ttl=timedelta(seconds=s.principal_ttl_seconds),
            max_lifetime=timedelta(seconds=s.principal_max_lifetime_seconds),
        )

    async def start(self) -> int:
        s = self.gateway_settings
        signer = self._signer()
        jwt_verifier = JwtVerifier.from_settings(
            hs256_spec=s.jwt_hs256_secrets.get_secret_value(),
            public_keys_file=s.jwt_public_keys_file,
            jwks_file=s.jwks_file,
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
            leeway=s.jwt_leeway_seconds,
            tenant_claim=s.jwt_tenant_claim,
            permissions_claim=s.jwt_permissions_claim,
        )
        # A blocking pool: under a burst, calls wait (within the timeout) for a connection
        # instead of failing at once as if Redis were down.
        pool = BlockingConnectionPool.from_url(
            s.redis_url,
            max_connections=s.redis_max_connections,
            timeout=s.redis_timeout_seconds,
            socket_timeout=s.redis_timeout_seconds,
            socket_connect_timeout=s.redis_timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )
        self.redis = Redis(connection_pool=pool)
        self.state = RedisState(self.redis, prefix=s.key_prefix, timeout=s.redis_timeout_seconds)
        tracer = self.telemetry.tracer_provider if self.telemetry else None
        self._channel = open_channel(
            s.orchestrator_address,
            settings=s,
            retry_methods=idempotent_methods(
                orchestrator_service_pb2.DESCRIPTOR.services_by_name["RunService"],
                orchestrator_service_pb2.DESCRIPTOR.services_by_name["AgentService"],
            ),
            tracer_provider=tracer,
            name="orchestrator",
        )
        self.orchestrator = Orchestrator(self._channel)
        self.gate = Gate(s, self.state, jwt_verifier, signer, self.admission_metrics)
        gate = self.gate
        settler_permissions = ("runs:read",)

        def mint_for(tenant: str, user: str, kind: str) -> str:
            return gate.mint(tenant, user, settler_permissions, (), kind or "user")[0]

        self.settler = Settler(
            self.state,
            self.orchestrator,
            mint_for,
            lease_seconds=s.reservation_lease_seconds,
            submit_grace_seconds=s.submit_grace_seconds,
            interval=s.settle_interval_seconds,
            watch_runs=s.watch_runs,
        )
        self._gateway = GatewayServicer(s, self.gate, self.state, self.orchestrator, self.settler)
        self._admin = AdminServicer(s, self.gate, self.state)
        if s.data_dir is not None:
            path = await ensure_credentials(
                self.state,
                s.data_dir,
                tenant=s.bootstrap_tenant,
                user=s.bootstrap_user,
                admin_tenant=s.admin_tenant,
            )
            get_logger("foredeck_gateway.server").info("credentials file ready", path=str(path))
        port = await super().start()
        self.settler.start()
        return port

    async def _stop(self, grace: float | None) -> None:
        await super()._stop(grace)
        if self.settler is not None:
            await self.settler.stop()
        if self._channel is not None:
            await self._channel.close(None)
        if self.redis is not None:
            await self.redis.aclose()


def build_server(settings: GatewaySettings, *, telemetry: Telemetry | None = None) -> GatewayHost:
    """Describe the gateway's server; nothing binds or connects until ``start()``."""
    return GatewayHost(settings, telemetry=telemetry)


def test_principal_keys() -> str:
    """A fresh principal key spec, for tests and the benchmark."""
    return f"gw-test:{generate_key().decode()}"
