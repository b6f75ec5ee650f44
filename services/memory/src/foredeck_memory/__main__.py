"""``python -m foredeck_memory``: settings → telemetry → serve()."""

from __future__ import annotations

import asyncio

from foredeck_kit.server import serve
from foredeck_kit.settings import load_settings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_memory.config import MemorySettings
from foredeck_memory.server import MemoryDeps, build_server


def main() -> None:
    """Run the memory server until SIGTERM or SIGINT."""
    settings = load_settings(MemorySettings)
    telemetry = setup_telemetry(settings.service_name, settings)
    try:
        raise SystemExit(
            asyncio.run(serve(build_server(settings, MemoryDeps(telemetry=telemetry))))
        )
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
