"""Start a real service in-process for tests: real gRPC on 127.0.0.1, a free port, real keys.

::

    async with running_server(register, service_names=[NAME], domain="memory.foredeck.dev") as srv:
        stub = MemoryServiceStub(srv.channel)
        await stub.Recall(request, metadata=srv.mint(permissions=["memory:read"]))
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import grpc
import grpc.aio

from foredeck_kit.context import REQUEST_ID_METADATA_KEY
from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.handlers import Middleware
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    PrincipalKind,
    PrincipalSigner,
    PrincipalVerifier,
    generate_key,
)
from foredeck_kit.server import (
    DEFAULT_READINESS_INTERVAL,
    DEFAULT_READINESS_TIMEOUT,
    Readiness,
    Register,
    ServiceHost,
    build_grpc_server,
)
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import Telemetry

__all__ = [
    "Metadata",
    "RunningServer",
    "fresh_delegation_keys",
    "fresh_keys",
    "running_server",
]

Metadata = tuple[tuple[str, str], ...]

_TEST_KID = "test"
_TEST_DELEGATION_KID = "test-delegation"


def fresh_keys() -> dict[str, bytes]:
    """Return a fresh single-key set for signing and verifying principals in one test."""
    return {_TEST_KID: generate_key()}


def fresh_delegation_keys() -> dict[str, bytes]:
    """Return a fresh single-key set for delegated principals, its key id distinct from
    :func:`fresh_keys`'s."""
    return {_TEST_DELEGATION_KID: generate_key()}


@dataclass
class RunningServer:
    """A started service: where it listens, a channel to it, and a way to mint principals."""

    host: ServiceHost
    channel: grpc.aio.Channel
    signer: PrincipalSigner
    keys: Mapping[str, bytes]
    delegation_signer: DelegationSigner
    delegation_keys: Mapping[str, bytes]

    @property
    def port(self) -> int:
        """The bound port."""
        return self.host.port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, ready for a channel."""
        return self.host.address

    def token(
        self,
        tenant_id: str = "tenant-a",
        user_id: str = "user-a",
        permissions: Iterable[str] = ("*",),
        *,
        budget_ids: Iterable[str] = (),
        kind: PrincipalKind = PrincipalKind.USER,
        ttl: timedelta | None = None,
    ) -> str:
        """Return a principal token signed with this server's key."""
        return self.signer.mint(
            tenant_id=tenant_id,
            user_id=user_id,
            permissions=permissions,
            budget_ids=budget_ids,
            kind=kind,
            ttl=ttl,
        )

    def delegated_token(
        self,
        run_id: str,
        tenant_id: str = "tenant-a",
        user_id: str = "user-a",
        permissions: Iterable[str] = ("*",),
        *,
        budget_ids: Iterable[str] = (),
    ) -> str:
        """Return a principal the orchestrator would mint for a call made by run ``run_id``."""
        claims = RunClaims(
            tenant_id=tenant_id,
            user_id=user_id,
            permissions=tuple(permissions),
            budget_ids=tuple(budget_ids),
        )
        return self.delegation_signer.mint_for_run(claims, run_id)

    def mint(
        self,
        tenant_id: str = "tenant-a",
        user_id: str = "user-a",
        permissions: Iterable[str] = ("*",),
        *,
        budget_ids: Iterable[str] = (),
        kind: PrincipalKind = PrincipalKind.USER,
        request_id: str | None = None,
    ) -> Metadata:
        """Return call metadata carrying a fresh principal (and a request id when given)."""
        metadata: list[tuple[str, str]] = [
            (
                PRINCIPAL_METADATA_KEY,
                self.token(tenant_id, user_id, permissions, budget_ids=budget_ids, kind=kind),
            )
        ]
        if request_id is not None:
            metadata.append((REQUEST_ID_METADATA_KEY, request_id))
        return tuple(metadata)


@asynccontextmanager
async def running_server(
    register: Register,
    *,
    service_names: Sequence[str],
    domain: str,
    settings: ServiceSettings | None = None,
    public_methods: Collection[str] = (),
    readiness: Readiness | None = None,
    keys: Mapping[str, bytes] | None = None,
    delegation_keys: Mapping[str, bytes] | None = None,
    gateway_only_methods: Collection[str] = (),
    telemetry: Telemetry | None = None,
    middleware: Sequence[Middleware] = (),
    readiness_interval: float = DEFAULT_READINESS_INTERVAL,
    readiness_timeout: float = DEFAULT_READINESS_TIMEOUT,
    wait_ready: bool = True,
    ready_timeout: float = 30.0,
) -> AsyncIterator[RunningServer]:
    """Start the service on ``127.0.0.1:0`` and stop it on exit.

    ``keys`` defaults to a fresh test key; pass the same keys to two servers to let one call
    the other with a forwarded principal. ``delegation_keys`` (fresh by default) verify the
    principals the orchestrator mints for runs (``RunningServer.delegated_token``), which
    ``gateway_only_methods`` refuse. With ``wait_ready`` the block starts only once health shows
    SERVING.
    """
    signing_keys = dict(keys) if keys is not None else fresh_keys()
    run_keys = dict(delegation_keys) if delegation_keys is not None else fresh_delegation_keys()
    base = settings if settings is not None else ServiceSettings(grace_period_seconds=1.0)
    effective = base.model_copy(
        update={"host": "127.0.0.1", "port": 0, "metrics_port": -1, "drain_seconds": 0.0}
    )
    host = build_grpc_server(
        effective,
        domain=domain,
        register=register,
        service_names=service_names,
        verifier=PrincipalVerifier(
            signing_keys,
            issuer=effective.principal_issuer,
            audience=effective.principal_audience,
            delegation_keys=run_keys,
            gateway_only_methods=gateway_only_methods,
        ),
        public_methods=public_methods,
        readiness=readiness,
        telemetry=telemetry,
        middleware=middleware,
        readiness_interval=readiness_interval,
        readiness_timeout=readiness_timeout,
    )
    await host.start()
    try:
        if wait_ready:
            async with asyncio.timeout(ready_timeout):
                await host.wait_ready()
        channel = grpc.aio.insecure_channel(host.address)
        try:
            yield RunningServer(
                host=host,
                channel=channel,
                signer=PrincipalSigner(
                    signing_keys,
                    next(iter(signing_keys)),
                    issuer=effective.principal_issuer,
                    audience=effective.principal_audience,
                ),
                keys=signing_keys,
                delegation_signer=DelegationSigner(
                    run_keys, next(iter(run_keys)), audience=effective.principal_audience
                ),
                delegation_keys=run_keys,
            )
        finally:
            await channel.close(None)
    finally:
        await host.stop(grace=0)
