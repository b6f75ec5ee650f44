"""The compose file is valid against the compose specification and its mounts exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


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


def test_compose_bind_mounts_point_at_files_in_the_repo() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    mounts = [
        volume.split(":", 1)[0]
        for service in spec["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith("./")
    ]
    assert mounts, "expected the collector and Prometheus configs to be mounted"
    missing = [m for m in mounts if not (ROOT / m).is_file()]
    assert missing == []
