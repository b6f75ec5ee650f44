"""A run submitted to the API role and driven by a worker process through the real llmrouter
(the kit's scripted provider behind it), the real toolrunner and the real memory service."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from foredeck.common.v1 import agent_pb2, journal_pb2, run_pb2
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck_kit.principal import format_keys
from foredeck_orchestrator.config import OrchestratorSettings
from foredeck_testing.provider import ScriptedProvider, TextReply
from foredeck_testing.stores import GraphDatabaseRef
from services.orchestrator.tests.loop_support import plan_text, tool_step
from services.orchestrator.tests.service.runtime_support import (
    api_server,
    consumer_seen,
    spawn_worker,
    wait_for,
)
from services.orchestrator.tests.service.test_loop_real_services import real_stack

pytestmark = pytest.mark.slow


async def test_a_submitted_run_goes_through_the_real_services(
    scripted_provider: ScriptedProvider,
    redis_url: str,
    redis_client: Redis,
    graph_database: GraphDatabaseRef,
    tmp_path: Path,
) -> None:
    scripted_provider.enqueue(
        TextReply(plan_text(tool_step("calculator", {"expression": "6*7"}))),
        TextReply("Six times seven is 42."),
    )
    async with real_stack(scripted_provider, redis_url, graph_database, tmp_path) as stack:
        settings = OrchestratorSettings(
            redis_url=redis_url,
            port=0,
            metrics_port=-1,
            drain_seconds=0.0,
            principal_keys=SecretStr(format_keys(stack.llmrouter.keys)),
            delegation_keys=SecretStr(format_keys(stack.llmrouter.delegation_keys)),
            llmrouter_address=stack.llmrouter.address,
            toolrunner_address=stack.toolrunner.address,
            memory_address=stack.memory.host.address,
            lease_seconds=5.0,
        )
        async with api_server(settings) as api:
            await api.create_agent(
                model="gpt-4o-mini",
                memory_policy=agent_pb2.MemoryPolicy(remember_results=True),
            )
            run_id = (await api.submit()).run.run_id
            worker = spawn_worker(settings, tmp_path, "real")
            try:
                await wait_for(
                    lambda: consumer_seen(redis_client, settings, worker.worker_id),
                    within=60,
                    what="the worker",
                )
                await wait_for(lambda: api.finished(run_id), within=60, what="the run")
            finally:
                worker.signal(signal.SIGTERM)
                code = worker.process.wait(timeout=30)
            run = await api.run(run_id)
            raws: Any = await redis_client.lrange(f"fdorch:run:{{{run_id}}}:journal", 0, -1)
        recalled = await stack.memory.long_term.Recall(
            mem.RecallRequest(query="What is 6 times 7?", limit=5),
            metadata=stack.memory.as_user(),
        )

    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED, (run.error, worker.log()[-3000:])
    assert run.output == "Six times seven is 42."
    assert code == 0
    entries = [journal_pb2.JournalEntry.FromString(raw) for raw in raws]
    tool = next(e for e in entries if e.HasField("tool_exchange"))
    assert json.loads(tool.tool_exchange.result.content) == {"result": 42.0}
    assert tool.tool_exchange.idempotency_key == f"{run_id}:{tool.step_id}"
    provenances = [m.memory.provenance.run_id for m in recalled.memories]
    assert run_id in provenances
