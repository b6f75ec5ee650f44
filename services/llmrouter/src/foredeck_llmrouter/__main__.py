"""Entry point: ``python -m foredeck_llmrouter``."""

from __future__ import annotations

import asyncio

from foredeck_kit.server import serve
from foredeck_kit.settings import load_settings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_llmrouter.config import LlmRouterSettings
from foredeck_llmrouter.server import RouterDeps, build_server


def main() -> None:
    """Read settings, set up telemetry and serve until SIGTERM."""
    settings = load_settings(LlmRouterSettings)
    telemetry = setup_telemetry(settings.service_name, settings)
    try:
        raise SystemExit(asyncio.run(serve(build_server(settings, RouterDeps(telemetry)))))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
