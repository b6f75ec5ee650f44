"""How the stack finds services through entry points and orders them by what they need."""

from __future__ import annotations

import importlib.metadata
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from foredeck_stack.services import (
    ENTRY_POINT_GROUP,
    StackConfigError,
    StackContext,
    StackService,
    discover_services,
    env_prefix,
    select_services,
)


def no_env(ctx: StackContext) -> Mapping[str, str]:
    return {}


def service(name: str, *needs: str) -> StackService:
    return StackService(
        name=name, module=f"foredeck_{name.replace('-', '_')}", needs=needs, env=no_env
    )


@dataclass
class FakeEntryPoint:
    name: str
    target: object

    @property
    def value(self) -> str:
        return f"fake_package.stack:{self.name}"

    def load(self) -> object:
        if isinstance(self.target, Exception):
            raise self.target
        return self.target


def publish(monkeypatch: pytest.MonkeyPatch, *services: StackService | FakeEntryPoint) -> None:
    """Make importlib.metadata report these as the installed ``foredeck.stack`` entry points."""
    entries = [s if isinstance(s, FakeEntryPoint) else FakeEntryPoint(s.name, s) for s in services]

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        return entries if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


PLATFORM = [
    service("gateway", "redis", "orchestrator-api"),
    service("orchestrator-api", "redis", "llmrouter", "toolrunner", "memory"),
    service("orchestrator-worker", "redis", "llmrouter", "toolrunner", "memory"),
    service("memory", "redis", "graph", "llmrouter"),
    service("toolrunner", "redis"),
    service("llmrouter", "redis"),
]


def test_services_come_after_what_they_need_whatever_the_install_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shuffled = PLATFORM.copy()
    random.Random(7).shuffle(shuffled)
    publish(monkeypatch, *shuffled)

    names = [s.name for s in discover_services()]

    assert names == [
        "llmrouter",
        "toolrunner",
        "memory",
        "orchestrator-api",
        "orchestrator-worker",
        "gateway",
    ]


def test_a_dependency_cycle_is_reported_with_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    publish(monkeypatch, service("a", "b"), service("b", "c"), service("c", "a"), service("d"))

    with pytest.raises(StackConfigError, match=r"cycle: a -> b -> c -> a"):
        discover_services()


def test_an_unknown_need_names_the_service_and_the_need(monkeypatch: pytest.MonkeyPatch) -> None:
    publish(monkeypatch, service("memory", "redis", "graph", "embedder"))

    with pytest.raises(StackConfigError, match=r"memory needs 'embedder'"):
        discover_services()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (FakeEntryPoint("llmrouter", "not a service"), "is a str, not a StackService"),
        (FakeEntryPoint("llmrouter", service("router")), "names its service 'router'"),
        (FakeEntryPoint("llmrouter", ImportError("no module x")), "cannot load .*no module x"),
        (FakeEntryPoint("redis", service("redis")), "name of a store"),
    ],
)
def test_bad_entry_points_are_refused(
    monkeypatch: pytest.MonkeyPatch, entry: FakeEntryPoint, message: str
) -> None:
    publish(monkeypatch, entry)

    with pytest.raises(StackConfigError, match=message):
        discover_services()


def test_two_services_with_one_name_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    publish(monkeypatch, service("memory"), FakeEntryPoint("memory", service("memory", "redis")))

    with pytest.raises(StackConfigError, match="two services are named 'memory'"):
        discover_services()


def test_only_keeps_the_named_services_and_what_they_need() -> None:
    ordered = [service("llmrouter"), service("toolrunner"), service("memory", "llmrouter")]

    assert [s.name for s in select_services(ordered, ["memory"])] == ["llmrouter", "memory"]
    assert select_services(ordered, []) == []
    with pytest.raises(StackConfigError, match=r"unknown service\(s\) nope"):
        select_services(ordered, ["nope"])


@pytest.mark.parametrize(
    ("name", "needs", "message"),
    [
        ("Gateway", (), "invalid stack service name"),
        ("gateway", ("gateway",), "needs itself"),
    ],
)
def test_invalid_declarations_fail_where_they_are_written(
    name: str, needs: tuple[str, ...], message: str
) -> None:
    with pytest.raises(StackConfigError, match=message):
        StackService(name=name, module="foredeck_gateway", needs=needs, env=no_env)


def test_context_builds_the_settings_every_service_reads(tmp_path: Path) -> None:
    ctx = StackContext(
        name="orchestrator-api",
        host="127.0.0.1",
        port=50123,
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:6390/0",
        bolt_uri="bolt://127.0.0.1:7690",
        bolt_user="root",
        bolt_password="password",
        graph_database="foredeck",
        graph_http_url="http://127.0.0.1:2480",
        services={"llmrouter": "127.0.0.1:50100"},
        principal_keys={"old": "o" * 32, "new": "n" * 32},
        principal_active_kid="new",
        delegation_keys={"d-old": "p" * 32, "d-new": "q" * 32},
        delegation_active_kid="d-new",
    )

    assert env_prefix(ctx.name) == "FOREDECK_ORCHESTRATOR_API_"
    assert ctx.server_env() == {
        "FOREDECK_ORCHESTRATOR_API_HOST": "127.0.0.1",
        "FOREDECK_ORCHESTRATOR_API_PORT": "50123",
        "FOREDECK_ORCHESTRATOR_API_PRINCIPAL_KEYS": f"new:{'n' * 32},old:{'o' * 32}",
        "FOREDECK_ORCHESTRATOR_API_DELEGATION_KEYS": f"d-new:{'q' * 32},d-old:{'p' * 32}",
    }
    # Without delegation keys (a stack started before they existed) nothing else is sent.
    bare = replace(ctx, delegation_keys={}, delegation_active_kid="")
    assert "FOREDECK_ORCHESTRATOR_API_DELEGATION_KEYS" not in bare.server_env()
    assert ctx.service_address("llmrouter") == "127.0.0.1:50100"
    with pytest.raises(StackConfigError, match="add 'memory' to its needs"):
        ctx.service_address("memory")
