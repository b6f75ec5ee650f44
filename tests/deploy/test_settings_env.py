"""Every variable compose and Kubernetes give a Foredeck service is one its settings class reads.

Settings classes ignore unknown variables, so a misspelt name would silently leave a default in
place; these checks catch it. A service whose settings module is not importable (not built
yet) is skipped with the reason.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

from foredeck_kit.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "deploy/k8s/overlays").iterdir() if p.is_dir())

SETTINGS = {
    "FOREDECK_LLMROUTER_": "foredeck_llmrouter.config:LlmRouterSettings",
    "FOREDECK_TOOLRUNNER_": "foredeck_toolrunner.config:ToolRunnerSettings",
    "FOREDECK_MEMORY_": "foredeck_memory.config:MemorySettings",
    "FOREDECK_ORCHESTRATOR_": "foredeck_orchestrator.config:OrchestratorSettings",
    "FOREDECK_GATEWAY_": "foredeck_gateway.config:GatewaySettings",
}

# Read by the kit's telemetry (OpenTelemetry SDK and exporter) and by Kubernetes itself.
OTHER_VARIABLES = frozenset(
    {
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_TRACES_EXPORTER",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_PROPAGATORS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BSP_EXPORT_TIMEOUT",
        "HOME",
        "POD_NAME",
        "POD_NAMESPACE",
    }
)


def variables_read_by(cls: type[BaseSettings]) -> set[str]:
    """The environment variable names ``cls`` reads (upper case), aliases included."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasPath):
            names.add(str(alias.path[0]).upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def load_settings_class(prefix: str) -> type[ServiceSettings]:
    """The settings class of the service with ``prefix``; skips while it does not exist yet."""
    module_name, _, class_name = SETTINGS[prefix].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.skip(f"{module_name} is not importable yet ({exc}); its variables go unchecked")
    found: object = getattr(module, class_name, None)
    if found is None:
        pytest.skip(f"{module_name} has no {class_name} yet; its variables go unchecked")
    assert isinstance(found, type)
    assert issubclass(found, ServiceSettings)
    assert found.model_config.get("env_prefix") == prefix
    return found


def prefix_of(service: str) -> str:
    """``orchestrator-worker`` -> ``FOREDECK_ORCHESTRATOR_``."""
    return f"FOREDECK_{service.split('-')[0].upper()}_"


def unknown_variables(prefix: str, names: set[str]) -> list[str]:
    """Every name in ``names`` that neither the settings class of ``prefix`` nor telemetry reads."""
    known = variables_read_by(load_settings_class(prefix)) | OTHER_VARIABLES
    return sorted(n for n in names if n.upper() not in known)


def kubectl() -> str:
    path = Path(sys.executable).parent / "kubectl"
    assert path.exists(), "kubectl is missing from the environment; `make setup` installs it"
    return str(path)


def compose_environments() -> list[tuple[str, str, set[str]]]:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    out = []
    for name, service in spec["services"].items():
        build = service.get("build")
        if isinstance(build, dict) and str(build.get("dockerfile", "")).startswith("services/"):
            env = service.get("environment", {})
            assert isinstance(env, dict), f"{name}: environment as a mapping, please"
            out.append((f"compose:{name}", name, set(env)))
    return out


def kubernetes_environments() -> list[tuple[str, str, set[str]]]:
    out = []
    for overlay in OVERLAYS:
        result = subprocess.run(
            [kubectl(), "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        for doc in yaml.safe_load_all(result.stdout):
            if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            name = doc["metadata"]["name"]
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if not str(container["image"]).startswith("foredeck/"):
                    continue
                assert "envFrom" not in container, "list each variable so it can be checked"
                names = {e["name"] for e in container.get("env", [])}
                out.append((f"{overlay}:{name}", name, names))
    return out


ENVIRONMENTS = compose_environments() + kubernetes_environments()


def test_every_foredeck_service_is_wired() -> None:
    expected = {
        "gateway",
        "orchestrator-api",
        "orchestrator-worker",
        "llmrouter",
        "toolrunner",
        "memory",
    }
    assert {
        service for where, service, _ in ENVIRONMENTS if where.startswith("compose:")
    } == expected
    for overlay in OVERLAYS:
        deployed = {
            service for where, service, _ in ENVIRONMENTS if where.startswith(f"{overlay}:")
        }
        assert deployed == expected, overlay


@pytest.mark.parametrize(
    ("where", "service", "names"), ENVIRONMENTS, ids=[where for where, _, _ in ENVIRONMENTS]
)
def test_environment_names_are_read_by_the_settings(
    where: str, service: str, names: set[str]
) -> None:
    prefix = prefix_of(service)
    assert any(n.startswith(prefix) for n in names), f"{where} sets no {prefix}* variable"
    unknown = unknown_variables(prefix, names)
    assert unknown == [], f"{where}: no settings field reads {unknown}"


def test_a_misspelt_or_foreign_variable_is_caught() -> None:
    prefix = "FOREDECK_LLMROUTER_"
    assert unknown_variables(prefix, {"FOREDECK_LLMROUTER_REDIS_URL", "OTEL_TRACES_SAMPLER"}) == []
    assert unknown_variables(prefix, {"FOREDECK_LLMROUTER_REDIS_ULR"}) == [
        "FOREDECK_LLMROUTER_REDIS_ULR"
    ]
    # Another service's variable in this service's environment is a mistake too.
    assert unknown_variables(prefix, {"FOREDECK_MEMORY_PORT"}) == ["FOREDECK_MEMORY_PORT"]
    # The provider SDKs' own names are aliases the router reads.
    assert unknown_variables(prefix, {"OPENAI_API_KEY", "ANTHROPIC_BASE_URL"}) == []
