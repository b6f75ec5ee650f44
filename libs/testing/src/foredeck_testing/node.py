"""Node.js for the tests that call Foredeck from another language."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["node_with_packages"]


def node_with_packages(directory: Path) -> str:
    """The ``node`` binary, with ``directory``'s locked npm packages installed (``npm ci`` when
    missing or older than the lock file); skips the test when Node.js is not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js checks need Node.js 18 or newer")
    installed = directory / "node_modules" / ".package-lock.json"
    lock = directory / "package-lock.json"
    if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not; install npm to run this check"
        # Install scripts are not needed by these packages; --ignore-scripts runs none of them.
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory,
            check=True,
            timeout=300,
        )
    return node
