"""The agent loop against the real llmrouter (scripted provider behind it), the real
toolrunner (its calculator built-in) and the real memory service, each on its own gRPC
server, with a worker that crashes twice between a call and its journal entry."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from foredeck.common.v1 import journal_pb2, run_pb2
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck_kit.errors import domain_for
from foredeck_llmrouter.config import LlmRouterSettings
from foredeck_llmrouter.server import RouterDeps, RouterRuntime
from foredeck_llmrouter.servicer import SERVICE_NAME as LLMROUTER_SERVICE
from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.server import MemoryDeps
from foredeck_memory.testing import MemoryServer, memory_settings, start_memory_server
from foredeck_orchestrator.clients import DownstreamClients
from foredeck_orchestrator.domain.loop import PlanActLoop
from foredeck_testing.provider import Endpoint, ScriptedProvider, TextReply
from foredeck_testing.server import (
    RunningServer,
    fresh_delegation_keys,
    fresh_keys,
    running_server,
)
from foredeck_testing.stores import GraphDatabaseRef
from foredeck_toolrunner.adapters.sandbox import Sandbox, probe
from foredeck_toolrunner.config import ToolRunnerSettings
from foredeck_toolrunner.errors import DOMAIN as TOOLRUNNER_DOMAIN
from foredeck_toolrunner.server import SERVICE_NAMES as TOOLRUNNER_SERVICES
from foredeck_toolrunner.server import Deps, ToolRunnerService
from services.orchestrator.tests.loop_support import (
    MemoryEvents,
    MemoryJournal,
    make_agent,
    make_context,
    make_run,
    plan_text,
    tool_step,
)

pytestmark = pytest.mark.slow


class WorkerCrashed(Exception):
    """The worker died after a call and before its journal entry was written."""


class CrashingJournal(MemoryJournal):
    """Writes nothing, and dies, when the entry of a step in ``crash_before`` arrives."""

    def __init__(
        self,
        run_id: str,
        entries: Sequence[journal_pb2.JournalEntry],
        crash_before: str | None,
    ) -> None:
        super().__init__(run_id, entries)
        self.crash_before = crash_before

    async def append(self, entry: journal_pb2.JournalEntry) -> journal_pb2.JournalEntry:
        if entry.step_id == self.crash_before:
            raise WorkerCrashed(entry.step_id)
        return await super().append(entry)


@dataclass
class Stack:
    llmrouter: RunningServer
    toolrunner: RunningServer
    memory: MemoryServer
    clients: DownstreamClients


@asynccontextmanager
async def real_stack(
    provider: ScriptedProvider, redis_url: str, graph: GraphDatabaseRef, tmp_path: Path
) -> AsyncIterator[Stack]:
    """llmrouter, toolrunner and memory sharing one set of principal and delegation keys."""
    keys, delegation = fresh_keys(), fresh_delegation_keys()
    async with AsyncExitStack() as stack:
        router_settings = LlmRouterSettings(
            openai_api_key=SecretStr("test-key"),
            openai_base_url=provider.openai_base_url,
            anthropic_api_key=SecretStr("test-key"),
            anthropic_base_url=provider.anthropic_base_url,
            redis_url=redis_url,
            local_enabled=False,
            local_embeddings_enabled=False,
            grace_period_seconds=1.0,
        )
        runtime = RouterRuntime(router_settings, RouterDeps())
        await runtime.open()
        stack.push_async_callback(runtime.close)
        llmrouter = await stack.enter_async_context(
            running_server(
                runtime.register,
                service_names=[LLMROUTER_SERVICE],
                domain=domain_for("llmrouter"),
                settings=router_settings,
                readiness=runtime.readiness,
                keys=keys,
                delegation_keys=delegation,
            )
        )

        tool_settings = ToolRunnerSettings(
            redis_url=redis_url, grace_period_seconds=1.0, metrics_port=-1
        )
        tool_service = ToolRunnerService(
            tool_settings,
            Deps(
                redis=Redis.from_url(redis_url),
                sandbox=Sandbox(await probe(), uid_base=430_000, max_concurrent=4, pool_size=1),
            ),
        )
        stack.push_async_callback(tool_service.close)
        toolrunner = await stack.enter_async_context(
            running_server(
                tool_service.register,
                service_names=TOOLRUNNER_SERVICES,
                domain=TOOLRUNNER_DOMAIN,
                settings=tool_settings,
                readiness=tool_service.readiness,
                keys=keys,
                delegation_keys=delegation,
            )
        )

        embedder = LocalEmbedder(batch_size=8, threads=1)
        stack.callback(embedder.close)
        memory = await start_memory_server(
            memory_settings(
                redis_url=redis_url,
                bolt_uri=graph.uri,
                bolt_user=graph.user,
                bolt_password=graph.password,
                graph_database=graph.name,
                edge_path=tmp_path / "vectors",
                keys=keys,
                delegation_keys=delegation,
            ),
            MemoryDeps(embedder=embedder, count_tokens=embedder.count_tokens),
            keys,
            delegation,
        )
        stack.push_async_callback(memory.stop)

        clients = DownstreamClients.open(
            llmrouter_address=llmrouter.address,
            toolrunner_address=toolrunner.address,
            memory_address=memory.host.address,
        )
        stack.push_async_callback(clients.close)
        yield Stack(llmrouter, toolrunner, memory, clients)


async def test_a_run_through_the_real_services_survives_two_crashes_without_repeating_effects(
    scripted_provider: ScriptedProvider,
    redis_url: str,
    graph_database: GraphDatabaseRef,
    tmp_path: Path,
) -> None:
    scripted_provider.enqueue(
        TextReply(plan_text(tool_step("calculator", {"expression": "6*7"}))),
        TextReply("Six times seven is 42."),
    )
    agent = make_agent(tools=("calculator",), recall=True, remember=True)
    async with real_stack(scripted_provider, redis_url, graph_database, tmp_path) as stack:
        loop = PlanActLoop(stack.clients.downstreams)
        committed: list[journal_pb2.JournalEntry] = []
        # The first worker dies once the plan is generated, the second once the tool ran; the
        # third finishes the run from what the journal holds.
        for crash_before in ("s2", "s2.1", None):
            journal = CrashingJournal("run-1", committed, crash_before)
            ctx = make_context(
                make_run(),
                agent,
                journal,
                MemoryEvents("run-1"),
                credentials=lambda: stack.llmrouter.delegated_token("run-1"),
            )
            if crash_before is None:
                outcome = await loop.execute(ctx)
            else:
                with pytest.raises(WorkerCrashed):
                    await loop.execute(ctx)
            committed = journal.stored

        assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED, outcome.error
        assert outcome.output == "Six times seven is 42."
        assert [e.step_id for e in committed] == ["s1", "s2", "s2.1", "s4", "s5"]
        plan, tool = committed[1], committed[2]
        # The plan was generated once: the resumed worker's request id got the recorded answer.
        generating = scripted_provider.requests_to(Endpoint.OPENAI_CHAT_COMPLETIONS)
        assert len(generating) == 2
        assert plan.llm_exchange.idempotency_key == "run-1:s2:1"
        # The calculator ran once: the resumed call got the ledger's recorded outcome.
        assert tool.tool_exchange.replayed
        assert json.loads(tool.tool_exchange.result.content) == {"result": 42.0}
        assert outcome.usage.output_tokens > 0

        # The run's answer is in long-term memory, with the run and step that wrote it.
        recalled = await stack.memory.long_term.Recall(
            mem.RecallRequest(query="What is 6 times 7?", limit=5),
            metadata=stack.memory.as_user(),
        )
        provenances = [
            (m.memory.provenance.run_id, m.memory.provenance.step_id) for m in recalled.memories
        ]
        assert ("run-1", "s5") in provenances
