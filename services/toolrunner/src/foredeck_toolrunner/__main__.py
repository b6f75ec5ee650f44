"""``python -m foredeck_toolrunner``: settings -> telemetry -> serve."""

from __future__ import annotations

import asyncio

from foredeck_kit.server import serve
from foredeck_kit.settings import load_settings
from foredeck_kit.telemetry import Telemetry, setup_telemetry
from foredeck_toolrunner.config import ToolRunnerSettings
from foredeck_toolrunner.server import build_deps, build_server


async def _run(settings: ToolRunnerSettings, telemetry: Telemetry) -> int:
    deps = await build_deps(settings, telemetry)
    host = build_server(settings, deps)
    try:
        return await serve(host)
    finally:
        await host.toolrunner.close()  # type: ignore[attr-defined]


def main() -> None:
    """Run the tool runner until SIGTERM or SIGINT."""
    settings = load_settings(ToolRunnerSettings)
    telemetry = setup_telemetry(settings.service_name, settings)
    try:
        raise SystemExit(asyncio.run(_run(settings, telemetry)))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
