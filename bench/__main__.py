"""Run every benchmark (``make bench``)."""

from __future__ import annotations

import asyncio

from bench import (
    gateway_admission,
    kit_overhead,
    llmrouter_vs_litellm,
    memory_recall,
    orchestrator_overhead,
    principal_verify,
    toolrunner_sandbox,
)


def main() -> None:
    """Run the benchmarks one after another; each prints its own table."""
    asyncio.run(kit_overhead.run())
    principal_verify.run()
    asyncio.run(llmrouter_vs_litellm.run())
    asyncio.run(toolrunner_sandbox.run())
    asyncio.run(memory_recall.run())
    asyncio.run(orchestrator_overhead.run())
    asyncio.run(gateway_admission.run())


if __name__ == "__main__":
    main()
