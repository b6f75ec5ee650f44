"""``python -m foredeck_orchestrator``: the API role. settings → telemetry → serve()."""

from __future__ import annotations

import asyncio

from foredeck_kit.server import serve
from foredeck_kit.settings import load_settings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_orchestrator.config import OrchestratorSettings
from foredeck_orchestrator.server import ApiDeps, build_server


def main() -> None:
    """Run the API role until SIGTERM or SIGINT."""
    settings = load_settings(OrchestratorSettings)
    telemetry = setup_telemetry(settings.service_name, settings)
    try:
        raise SystemExit(asyncio.run(serve(build_server(settings, ApiDeps(telemetry=telemetry)))))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
