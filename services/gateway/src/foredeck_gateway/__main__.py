"""``python -m foredeck_gateway``: settings -> telemetry -> serve."""

from __future__ import annotations

import asyncio

from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.server import build_server
from foredeck_kit.server import serve
from foredeck_kit.settings import load_settings
from foredeck_kit.telemetry import setup_telemetry


def main() -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    settings = load_settings(GatewaySettings)
    telemetry = setup_telemetry(settings.service_name, settings)
    try:
        raise SystemExit(asyncio.run(serve(build_server(settings, telemetry=telemetry))))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
