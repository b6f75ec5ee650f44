"""Run the scripted provider as a process: `python -m foredeck_testing.provider`.

The first line written to stdout is the base URL (`http://127.0.0.1:PORT`; OpenAI clients append
`/v1`). The server runs until SIGINT or SIGTERM. Steps can be added while it runs with
`POST /_scripted/steps` (same JSON as a script file) and the recorded requests read with
`GET /_scripted/requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from foredeck_testing.provider.script import Script, ScriptError, load_script
from foredeck_testing.provider.server import ScriptedProvider


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m foredeck_testing.provider",
        description="Serve scripted Anthropic and OpenAI API answers.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--script", help="JSON script file: {'default': step, 'steps': [...]}")
    parser.add_argument("--api-key", help="refuse requests that do not carry this API key")
    parser.add_argument(
        "--embedding-dimensions", type=int, default=16, help="length of embedding vectors"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="do not keep requests (for long load runs)"
    )
    return parser


async def _serve(provider: ScriptedProvider) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with provider:
        sys.stdout.write(provider.base_url + "\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve until stopped; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        script = load_script(args.script) if args.script else Script()
    except (OSError, ScriptError) as error:
        parser.error(str(error))
    provider = ScriptedProvider(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        embedding_dimensions=args.embedding_dimensions,
        record_requests=not args.no_record,
        script=script,
    )
    asyncio.run(_serve(provider))
    return 0


if __name__ == "__main__":
    sys.exit(main())
