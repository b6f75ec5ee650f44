"""The compose file: valid against the compose specification, its mounts present, its services
started in health order, every Foredeck service scraped, and the dashboard on real metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from foredeck_kit.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
METRICS_PORT = 9464


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def foredeck_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in spec["services"].items()
        if str(service.get("build", {}).get("dockerfile", "")).startswith("services/")
    }


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_bind_mounts_point_at_files_in_the_repo(spec: dict[str, Any]) -> None:
    mounts = [
        volume.split(":", 1)[0]
        for service in spec["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith("./")
    ]
    assert mounts, "expected the collector, Prometheus and Grafana configs to be mounted"
    missing = [m for m in mounts if not (ROOT / m).exists()]
    assert missing == []


def test_named_volumes_are_declared_and_stores_keep_their_data(spec: dict[str, Any]) -> None:
    declared = set(spec.get("volumes", {}))
    used = {
        volume.split(":", 1)[0]
        for service in spec["services"].values()
        for volume in service.get("volumes", [])
        if not volume.startswith(("./", "/"))
    }
    assert used <= declared
    for store in ("redis", "qdrant", "neo4j"):
        assert any(not v.startswith("./") for v in spec["services"][store].get("volumes", [])), (
            store
        )


def test_the_stack_holds_every_part(spec: dict[str, Any]) -> None:
    assert {
        "redis",
        "qdrant",
        "neo4j",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
        "gateway",
        "orchestrator-api",
        "orchestrator-worker",
        "llmrouter",
        "toolrunner",
        "memory",
    } <= set(spec["services"])
    commands = {
        name: service.get("command")
        for name, service in spec["services"].items()
        if name.startswith("orchestrator")
    }
    # Two roles from one image.
    assert commands == {
        "orchestrator-api": ["-m", "foredeck_orchestrator"],
        "orchestrator-worker": ["-m", "foredeck_orchestrator.worker"],
    }
    orchestrators = [spec["services"][n] for n in commands]
    assert len({(s["image"], s["build"]["dockerfile"]) for s in orchestrators}) == 1


def hosts_named(value: str, services: set[str]) -> set[str]:
    """Compose services an environment value points at (``host:port`` or a URL)."""
    host = urlsplit(value).hostname if "://" in value else value.rpartition(":")[0]
    return {host} & services if host else set()


def test_services_start_after_what_they_call_is_healthy(spec: dict[str, Any]) -> None:
    services = set(spec["services"])
    problems = []
    for name, service in foredeck_services(spec).items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on with conditions"
        assert "healthcheck" in service, name
        for value in map(str, service.get("environment", {}).values()):
            for target in hosts_named(value, services):
                wanted = (
                    "service_healthy"
                    if "healthcheck" in spec["services"][target]
                    else "service_started"
                )
                got = depends.get(target, {}).get("condition")
                if got != wanted:
                    problems.append(f"{name} -> {target}: {got} (want {wanted})")
    assert problems == []


def test_prometheus_scrapes_every_foredeck_service(spec: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy/config/prometheus.yml").read_text())
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update(f"{n}:{dns['port']}" for n in dns["names"])
    wanted = {f"{name}:{METRICS_PORT}" for name in foredeck_services(spec)}
    assert wanted - targets == set()
    # The port scraped is the port each image serves its metrics on.
    for name in foredeck_services(spec):
        dockerfile = (ROOT / spec["services"][name]["build"]["dockerfile"]).read_text()
        assert re.search(rf"_METRICS_PORT={METRICS_PORT}\b", dockerfile), name


def test_dashboard_queries_only_metrics_the_services_export() -> None:
    exported: set[str] = set()
    for family in Metrics().registry.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        # Series that appear with the first sample of a labelled metric.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        exported.update(family.name + s for s in suffixes.get(family.type, ()))
    dashboards = list((ROOT / "deploy/config/grafana/dashboards").glob("*.json"))
    assert dashboards
    used: set[str] = set()
    for path in dashboards:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                # Label names (in `by (...)` and `{...}`) are not metric names.
                expr = re.sub(r"by \([^)]*\)|\{[^}]*\}", "", target["expr"])
                used.update(re.findall(r"\b((?:agent|grpc|foredeck)_[a-z_]+)\b", expr))
    assert {
        "agent_execution_seconds_bucket",
        "agent_tool_calls_total",
        "agent_llm_tokens_total",
        "agent_errors_total",
        "agent_concurrent_executions",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
    } <= used
    assert used - exported == set()
