"""How a service declares itself to the local stack (`foredeck up`), and how the stack finds it.

A service package exposes one `StackService` through the entry-point group ``foredeck.stack``::

    [project.entry-points."foredeck.stack"]
    llmrouter = "foredeck_llmrouter.stack:SERVICE"

The stack runner loads every such entry point, orders the services by what they need, picks a
free port for each, and runs ``python -m <module>`` with the environment the service's `env`
callable returns. Port convention: the runner chooses the port (`StackContext.port`) and the
service must listen on it, normally by returning ``FOREDECK_<NAME>_PORT`` from `env` (see
`StackContext.server_env`). Adding a service therefore needs no change to the runner.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from foredeck_kit.principal import format_keys

__all__ = [
    "ENTRY_POINT_GROUP",
    "STORES",
    "StackConfigError",
    "StackContext",
    "StackService",
    "discover_services",
    "env_prefix",
    "order_services",
    "select_services",
]

ENTRY_POINT_GROUP = "foredeck.stack"
STORES = frozenset({"redis", "graph"})
"""Names a service may list in `StackService.needs` for the data stores the stack starts."""

_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


class StackConfigError(ValueError):
    """The declared services cannot form a stack: bad entry point, unknown need, or a cycle."""


def env_prefix(name: str) -> str:
    """Environment prefix of a service's settings: ``llmrouter`` -> ``FOREDECK_LLMROUTER_``."""
    return "FOREDECK_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_"


@dataclass(frozen=True, kw_only=True)
class StackContext:
    """What the stack runner tells a service's `env` callable about the running stack."""

    name: str
    """The service being started."""
    host: str
    """Interface the service must bind (always loopback in the local stack)."""
    port: int
    """Port the runner picked for the service; it must listen there."""
    data_dir: Path
    """A directory that belongs to this service alone and survives restarts."""
    redis_url: str
    """``redis://`` URL of the stack's Redis."""
    bolt_uri: str
    """``bolt://`` URI of the stack's graph store (the ArcadeDB Bolt server)."""
    bolt_user: str
    bolt_password: str
    graph_database: str
    """Database a Bolt client gets when it names none."""
    graph_http_url: str
    """ArcadeDB's HTTP API, for creating further databases; empty when the store is Neo4j."""
    services: Mapping[str, str]
    """``host:port`` of every service started before this one, by name."""
    principal_keys: Mapping[str, str]
    """Principal signing keys of the stack by key id; shared by every service."""
    principal_active_kid: str
    """Key id new principals are signed with."""
    delegation_keys: Mapping[str, str] = field(default_factory=dict)
    """Keys the orchestrator signs delegated principals and approval tokens with, by key id;
    their ids never equal a principal key id. Every service verifies with them."""
    delegation_active_kid: str = ""
    """Key id new delegated principals are signed with; empty when there are no such keys."""

    @property
    def address(self) -> str:
        """``host:port`` this service listens on."""
        return f"{self.host}:{self.port}"

    @property
    def principal_keys_spec(self) -> str:
        """The keys as ``kid:secret,kid:secret``, the active key first (the settings format)."""
        kids = [
            self.principal_active_kid,
            *sorted(set(self.principal_keys) - {self.principal_active_kid}),
        ]
        return format_keys({kid: self.principal_keys[kid].encode() for kid in kids})

    @property
    def delegation_keys_spec(self) -> str:
        """The delegation keys in the settings format, the active key first; empty when none."""
        if not self.delegation_keys:
            return ""
        kids = [
            self.delegation_active_kid,
            *sorted(set(self.delegation_keys) - {self.delegation_active_kid}),
        ]
        return format_keys({kid: self.delegation_keys[kid].encode() for kid in kids})

    def service_address(self, name: str) -> str:
        """``host:port`` of a service started earlier; it must be listed in ``needs``."""
        try:
            return self.services[name]
        except KeyError:
            raise StackConfigError(
                f"{self.name} asked for the address of {name!r}, which is not started before it; "
                f"add {name!r} to its needs"
            ) from None

    def server_env(self, prefix: str | None = None) -> dict[str, str]:
        """The variables every service's settings read: host, port, principal and delegation keys.

        ``prefix`` defaults to ``FOREDECK_<NAME>_``; a service merges this with its own entries.
        """
        prefix = prefix if prefix is not None else env_prefix(self.name)
        env = {
            f"{prefix}HOST": self.host,
            f"{prefix}PORT": str(self.port),
            f"{prefix}PRINCIPAL_KEYS": self.principal_keys_spec,
        }
        if self.delegation_keys:
            env[f"{prefix}DELEGATION_KEYS"] = self.delegation_keys_spec
        return env


EnvFactory = Callable[[StackContext], Mapping[str, str]]


@dataclass(frozen=True, kw_only=True)
class StackService:
    """A service as the local stack runs it: ``python -m <module>`` with ``env(ctx)`` added.

    ``needs`` lists the stores (``"redis"``, ``"graph"``) and the other services that must be
    healthy before this one starts. ``health_service`` is the name checked with the standard
    ``grpc.health.v1`` Check (empty: the server as a whole).
    """

    name: str
    module: str
    env: EnvFactory
    needs: tuple[str, ...] = ()
    health_service: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise StackConfigError(
                f"invalid stack service name {self.name!r}: lower-case letters and digits, "
                "words joined by '-' or '_'"
            )
        if not _MODULE.fullmatch(self.module):
            raise StackConfigError(f"{self.name}: invalid module name {self.module!r}")
        if isinstance(self.needs, str) or not all(isinstance(n, str) for n in self.needs):
            raise StackConfigError(f"{self.name}: needs must be a tuple of names")
        if self.name in self.needs:
            raise StackConfigError(f"{self.name} needs itself")
        object.__setattr__(self, "needs", tuple(self.needs))

    @property
    def service_needs(self) -> tuple[str, ...]:
        """The services (not stores) this one depends on."""
        return tuple(n for n in self.needs if n not in STORES)

    @property
    def store_needs(self) -> tuple[str, ...]:
        """The stores this one uses."""
        return tuple(n for n in self.needs if n in STORES)


class _EntryPoint(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def value(self) -> str: ...

    def load(self) -> Any: ...


def discover_services(group: str = ENTRY_POINT_GROUP) -> list[StackService]:
    """Load every service published in the entry-point group, in dependency order."""
    entry_points: Iterable[_EntryPoint] = importlib.metadata.entry_points(group=group)
    services: list[StackService] = []
    for entry_point in entry_points:
        where = f"entry point {entry_point.name} = {entry_point.value!r} in group {group!r}"
        try:
            service = entry_point.load()
        except Exception as error:
            raise StackConfigError(f"cannot load {where}: {error}") from error
        if not isinstance(service, StackService):
            raise StackConfigError(f"{where} is a {type(service).__name__}, not a StackService")
        if service.name != entry_point.name:
            raise StackConfigError(f"{where} names its service {service.name!r}; use one name")
        services.append(service)
    return order_services(services)


def order_services(services: Iterable[StackService]) -> list[StackService]:
    """Order services so each comes after everything it needs (ties broken by name).

    Raises StackConfigError on duplicate names, needs that name nothing known, and cycles.
    """
    by_name: dict[str, StackService] = {}
    for service in services:
        if service.name in STORES:
            raise StackConfigError(f"{service.name!r} is the name of a store, not a service")
        if service.name in by_name:
            raise StackConfigError(f"two services are named {service.name!r}")
        by_name[service.name] = service
    for service in by_name.values():
        unknown = [n for n in service.service_needs if n not in by_name]
        if unknown:
            known = ", ".join(sorted(STORES | by_name.keys()))
            raise StackConfigError(
                f"{service.name} needs {', '.join(map(repr, unknown))}, which no installed "
                f"package provides (known: {known})"
            )

    ordered: list[StackService] = []
    placed: set[str] = set()
    pending = dict(sorted(by_name.items()))
    while pending:
        ready = [s for s in pending.values() if all(n in placed for n in s.service_needs)]
        if not ready:
            raise StackConfigError(f"services depend on each other in a cycle: {_cycle(pending)}")
        for service in ready:
            ordered.append(service)
            placed.add(service.name)
            del pending[service.name]
    return ordered


def _cycle(pending: Mapping[str, StackService]) -> str:
    """Describe one cycle among services none of which could be placed."""
    path: list[str] = []
    current = next(iter(pending))
    while current not in path:
        path.append(current)
        current = next(n for n in pending[current].service_needs if n in pending)
    cycle = [*path[path.index(current) :], current]
    return " -> ".join(cycle)


def select_services(ordered: Iterable[StackService], only: Collection[str]) -> list[StackService]:
    """Keep the named services and everything they need, preserving the given order."""
    services = list(ordered)
    by_name = {s.name: s for s in services}
    unknown = sorted(set(only) - by_name.keys())
    if unknown:
        known = ", ".join(sorted(by_name)) or "none installed"
        raise StackConfigError(f"unknown service(s) {', '.join(unknown)} (known: {known})")
    wanted: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].service_needs)
    return [s for s in services if s.name in wanted]
