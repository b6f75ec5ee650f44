"""Shared fixtures of the deployment checks: the repository's compose file and rendered overlays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "deploy/k8s/overlays").iterdir() if p.is_dir())


def tool(name: str) -> str:
    """A command-line tool installed in the workspace environment by a dev dependency."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is missing from the environment; `make setup` installs it")
    return str(path)


def render(overlay: str) -> str:
    """``kubectl kustomize`` of one overlay, as YAML text."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="session")
def rendered() -> dict[str, str]:
    """Every overlay rendered once per session, by overlay name."""
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def manifests(rendered: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every overlay's objects, by overlay name."""
    return {
        overlay: [doc for doc in yaml.safe_load_all(text) if doc]
        for overlay, text in rendered.items()
    }


@pytest.fixture(scope="session")
def find_tool() -> Any:
    """The function that locates a dev-dependency tool (kubectl, hadolint, ...)."""
    return tool
