"""Human approval of tool calls over real Redis, real gRPC and real worker processes.

The toolrunner stand-in does what the real one does with approval-gated tools: a call without
an approval token is refused (APPROVAL_REQUIRED, nothing runs), and a token is checked with the
kit's verifier against the exact call (tenant, run, step, tool, arguments).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from redis.asyncio import Redis

from foredeck.common.v1 import agent_pb2, approval_pb2, journal_pb2, run_event_pb2, run_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2_grpc as llm_grpc
from foredeck.memory.v1 import memory_service_pb2_grpc as mem_grpc
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck.toolrunner.v1 import execution_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as tools_grpc
from foredeck_kit.approval import ApprovalTokenVerifier, arguments_json_digest
from foredeck_kit.errors import ServiceError, error_details
from foredeck_orchestrator.config import OrchestratorSettings
from foredeck_testing.server import fresh_delegation_keys, fresh_keys, running_server
from services.orchestrator.tests.loop_support import plan_text, tool_step
from services.orchestrator.tests.service.loop_stand_ins import LlmStandIn, MemoryStandIn, Script
from services.orchestrator.tests.service.runtime_support import (
    Api,
    Downstreams,
    Effects,
    WorkerProcess,
    api_server,
    consumer_seen,
    settings_for,
    spawn_worker,
    wait_for,
)

pytestmark = pytest.mark.slow

WAITING = run_pb2.RUN_STATUS_WAITING_APPROVAL
SUCCEEDED = run_pb2.RUN_STATUS_SUCCEEDED
APPROVE = approval_pb2.APPROVAL_DECISION_APPROVE
DENY = approval_pb2.APPROVAL_DECISION_DENY
GATED = "transfer"


@dataclass
class Gate:
    """What the toolrunner stand-in saw: calls and effects by key, approvals it accepted."""

    calls: Counter[str] = field(default_factory=Counter)
    effects: Counter[str] = field(default_factory=Counter)
    approved: list[str] = field(default_factory=list)


class GatedTools(tools_grpc.ToolRunnerServiceServicer):
    """``transfer`` needs a valid approval token; ``calculator`` does not."""

    def __init__(self, gate: Gate, verifier: ApprovalTokenVerifier) -> None:
        self.gate = gate
        self.verifier = verifier

    async def ExecuteTool(
        self, request: tools.ExecuteToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools.ExecuteToolResponse:
        key = request.idempotency_key
        self.gate.calls[f"{request.tool_name} {key}"] += 1
        if request.tool_name == GATED:
            if not request.approval_token:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "APPROVAL_REQUIRED",
                    "the tool requires approval",
                    metadata={"toolName": request.tool_name},
                )
            approval = self.verifier.verify(
                request.approval_token,
                tool_name=request.tool_name,
                arguments_digest=arguments_json_digest(request.arguments_json),
                run_id=request.run_id,
                step_id=request.step_id,
            )
            self.gate.approved.append(f"{approval.run_id}:{approval.step_id}")
        if self.gate.effects[key] == 0:
            self.gate.effects[key] += 1
        return tools.ExecuteToolResponse(
            tool_name=request.tool_name,
            tool_call_id=request.tool_call_id,
            outcome=execution_pb2.ToolOutcome(
                output=execution_pb2.ToolOutput(output_json=json.dumps({"done": True}))
            ),
        )


@asynccontextmanager
async def gated_downstreams(script: Script) -> AsyncIterator[tuple[Downstreams, Gate]]:
    """The scripted llmrouter and memory, and the approval-checking toolrunner."""
    keys, delegation = fresh_keys(), fresh_delegation_keys()
    gate = Gate()
    llm = LlmStandIn(script)  # type: ignore[abstract]
    tool = GatedTools(gate, ApprovalTokenVerifier(delegation))
    memory = MemoryStandIn(script)  # type: ignore[abstract]
    async with AsyncExitStack() as stack:
        servers = []
        for name, domain, register in (
            (
                "foredeck.llmrouter.v1.LlmRouterService",
                "llmrouter.foredeck.dev",
                lambda s: llm_grpc.add_LlmRouterServiceServicer_to_server(llm, s),
            ),
            (
                "foredeck.toolrunner.v1.ToolRunnerService",
                "toolrunner.foredeck.dev",
                lambda s: tools_grpc.add_ToolRunnerServiceServicer_to_server(tool, s),
            ),
            (
                "foredeck.memory.v1.LongTermMemoryService",
                "memory.foredeck.dev",
                lambda s: mem_grpc.add_LongTermMemoryServiceServicer_to_server(memory, s),
            ),
        ):
            servers.append(
                await stack.enter_async_context(
                    running_server(
                        register,
                        service_names=[name],
                        domain=domain,
                        keys=keys,
                        delegation_keys=delegation,
                    )
                )
            )
        llmrouter, toolrunner, memory_server = servers
        yield (
            Downstreams(script, Effects(), llmrouter, toolrunner, memory_server, keys, delegation),
            gate,
        )


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; every one is gone when the test ends."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


async def start_worker(
    workers: list[WorkerProcess],
    settings: OrchestratorSettings,
    tmp_path: Path,
    redis: Redis,
    name: str,
) -> WorkerProcess:
    """A worker process, once it consumes from the queues."""
    worker = spawn_worker(settings, tmp_path, name)
    workers.append(worker)

    async def up() -> bool:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker exited: {worker.log()[-2000:]}")
        return await consumer_seen(redis, settings, worker.worker_id)

    await wait_for(up, within=60, what=f"worker {name} to consume")
    return worker


async def stop_worker(worker: WorkerProcess) -> None:
    """SIGTERM and wait for the process to exit."""
    worker.signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.process.wait, 30)
    assert code == 0


async def status_is(api: Api, run_id: str, status: int) -> bool:
    return (await api.run(run_id)).status == status


async def pending(api: Api, run_id: str = "") -> list[approval_pb2.Approval]:
    reply = await api.runs.ListApprovals(pb.ListApprovalsRequest(run_id=run_id), metadata=api.md())
    return list(reply.approvals)


async def resolve(
    api: Api, approval_id: str, decision: int, reason: str = "", **md: Any
) -> approval_pb2.Approval:
    reply = await api.runs.ResolveApproval(
        pb.ResolveApprovalRequest(
            approval_id=approval_id,
            decision=decision,  # type: ignore[arg-type]
            reason=reason,
        ),
        metadata=api.md(**md),
    )
    return reply.approval


async def journal(redis: Redis, run_id: str) -> list[journal_pb2.JournalEntry]:
    raws: Any = await redis.lrange(f"fdorch:run:{{{run_id}}}:journal", 0, -1)
    return [journal_pb2.JournalEntry.FromString(raw) for raw in raws]


async def events(redis: Redis, run_id: str) -> list[run_event_pb2.RunEvent]:
    entries: Any = await redis.xrange(f"fdorch:run:{{{run_id}}}:events")
    return [run_event_pb2.RunEvent.FromString(fields[b"e"]) for _, fields in entries]


async def held_anywhere(redis: Redis, run_id: str) -> dict[str, Any]:
    """Whether anything still holds the run: owner, lease, queue entries, slots."""
    record: Any = await redis.hgetall(f"fdorch:run:{{{run_id}}}")
    pending_entries = 0
    for queue in ("fdorch:queue:{high}", "fdorch:queue:{normal}", "fdorch:queue:{low}"):
        pending_entries += (await redis.xpending(queue, "workers"))["pending"]
        pending_entries += await redis.xlen(queue)
    return {
        "owner": record.get(b"owner", b"").decode(),
        "lease": int(record.get(b"lease", b"0")),
        "queued": pending_entries,
        "slots": await redis.zcard("fdorch:slots:{c}:global"),
    }


async def test_an_approval_survives_a_restart_of_every_process(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    script = Script(plans={"s1": plan_text(tool_step(GATED, {"amount": 5}))})
    async with gated_downstreams(script) as (ds, gate):
        settings = settings_for(redis_url, ds)
        policy = agent_pb2.ApprovalPolicy(tool_names=[GATED])
        async with api_server(settings) as api:
            await api.create_agent(tools=(GATED, "calculator"), approval_policy=policy)
            first = await start_worker(workers, settings, tmp_path, redis_client, "first")
            run_id = (await api.submit(text="pay 5")).run.run_id
            await wait_for(lambda: status_is(api, run_id, WAITING), what="the run to wait")
            waiting = await pending(api)
            of_run = await pending(api, run_id)
            holders = await held_anywhere(redis_client, run_id)
            calls_while_waiting = sum(gate.calls.values())
            with pytest.raises(grpc.aio.AioRpcError) as not_allowed:
                await resolve(api, waiting[0].approval_id, APPROVE, permissions=("runs:read",))
            with pytest.raises(grpc.aio.AioRpcError) as other_tenant:
                await resolve(api, waiting[0].approval_id, APPROVE, tenant_id="tenant-b")
            await stop_worker(first)
        # Every orchestrator process is gone; new ones pick the run up from Redis alone.
        async with api_server(settings) as api:
            await start_worker(workers, settings, tmp_path, redis_client, "second")
            approval_id = (await pending(api))[0].approval_id
            decided = await resolve(api, approval_id, APPROVE, reason="fine")
            await wait_for(lambda: api.finished(run_id), within=60, what="the run to finish")
            run = await api.run(run_id)
            again = await resolve(api, approval_id, APPROVE, reason="fine")
            with pytest.raises(grpc.aio.AioRpcError) as reversed_decision:
                await resolve(api, approval_id, DENY)
            left = await pending(api)
            entries = await journal(redis_client, run_id)
            run_events = await events(redis_client, run_id)
            replay = await api.runs.ReplayRun(
                pb.ReplayRunRequest(run_id=run_id, strict=True), metadata=api.md()
            )

    assert [a.run_id for a in waiting] == [run_id]
    assert of_run == waiting
    approval = waiting[0]
    assert approval.status == approval_pb2.APPROVAL_STATUS_PENDING
    assert approval.tool_call.tool_name == GATED
    assert approval.step_id == "s1.1"
    assert approval.expire_time.ToMilliseconds() > approval.request_time.ToMilliseconds()
    # Nothing holds a waiting run and the tool was never called without approval.
    assert holders == {"owner": "", "lease": 0, "queued": 0, "slots": 0}
    assert calls_while_waiting == 0
    assert not_allowed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(other_tenant.value).reason == "APPROVAL_NOT_FOUND"
    assert decided.status == approval_pb2.APPROVAL_STATUS_APPROVED
    assert decided.decided_by == "user-a"
    assert run.status == SUCCEEDED
    # The approved call ran once, under the run's key, with a token the toolrunner accepted.
    assert gate.approved == [f"{run_id}:s1.1"]
    assert gate.calls == Counter({f"{GATED} {run_id}:s1.1": 1})
    assert again == decided
    assert reversed_decision.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error_details(reversed_decision.value)
    assert details.reason == "APPROVAL_NOT_PENDING"
    assert dict(details.metadata)["status"] == "APPROVAL_STATUS_APPROVED"
    assert left == []
    tool_entries = [e for e in entries if e.step_id == "s1.1"]
    assert [e.outcome for e in tool_entries] == [
        journal_pb2.JOURNAL_ENTRY_OUTCOME_WAITING,
        journal_pb2.JOURNAL_ENTRY_OUTCOME_WAITING,
        journal_pb2.JOURNAL_ENTRY_OUTCOME_SUCCEEDED,
    ]
    assert [e.tool_exchange.approval_status for e in tool_entries] == [
        approval_pb2.APPROVAL_STATUS_PENDING,
        approval_pb2.APPROVAL_STATUS_APPROVED,
        approval_pb2.APPROVAL_STATUS_APPROVED,
    ]
    assert [e.entry_index for e in entries] == list(range(1, len(entries) + 1))
    # The waiting, decision and result entries replay like any other.
    assert replay.identical
    assert replay.replayed_entry_count == len(entries)
    assert gate.calls == Counter({f"{GATED} {run_id}:s1.1": 1})
    requested = [e.tool_call_requested for e in run_events if e.HasField("tool_call_requested")]
    assert requested[0].requires_approval
    assert requested[0].approval_id == approval_id
    approved = [e.tool_call_approved for e in run_events if e.HasField("tool_call_approved")]
    assert len(approved) == 1
    assert approved[0].approved
    assert approved[0].decided_by == "user-a"
    statuses = [e.status_changed.status for e in run_events if e.HasField("status_changed")]
    assert statuses == [
        run_pb2.RUN_STATUS_QUEUED,
        run_pb2.RUN_STATUS_RUNNING,
        WAITING,
        run_pb2.RUN_STATUS_QUEUED,
        run_pb2.RUN_STATUS_RUNNING,
        SUCCEEDED,
    ]


async def test_a_denied_call_is_journaled_and_the_run_replans_without_it(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    # No approval policy: the tool's own registration (toolrunner's APPROVAL_REQUIRED) asks.
    script = Script(
        plans={
            "s1": plan_text(tool_step(GATED, {"amount": 500})),
            "s3": plan_text(tool_step("calculator", {"expression": "6*7"})),
        }
    )
    async with gated_downstreams(script) as (ds, gate):
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent(tools=(GATED, "calculator"))
            await start_worker(workers, settings, tmp_path, redis_client, "w")
            run_id = (await api.submit(text="pay 500")).run.run_id
            await wait_for(lambda: status_is(api, run_id, WAITING), what="the run to wait")
            approval_id = (await pending(api, run_id))[0].approval_id
            denied = await resolve(api, approval_id, DENY, reason="not this month")
            await wait_for(lambda: api.finished(run_id), within=60, what="the run to finish")
            run = await api.run(run_id)
            entries = await journal(redis_client, run_id)
            run_events = await events(redis_client, run_id)
            with pytest.raises(grpc.aio.AioRpcError) as not_pending:
                await resolve(api, approval_id, APPROVE)

    assert denied.status == approval_pb2.APPROVAL_STATUS_DENIED
    assert denied.reason == "not this month"
    assert run.status == SUCCEEDED
    # The gated tool was asked once, refused for want of a token, and never ran.
    assert gate.calls[f"{GATED} {run_id}:s1.1"] == 1
    assert gate.approved == []
    assert gate.calls[f"calculator {run_id}:s3.1"] == 1
    final = [e for e in entries if e.step_id == "s1.1"][-1]
    assert final.outcome == journal_pb2.JOURNAL_ENTRY_OUTCOME_FAILED
    assert final.error.reason == "APPROVAL_DENIED"
    assert final.tool_exchange.approval_status == approval_pb2.APPROVAL_STATUS_DENIED
    replans = [e for e in entries if e.kind == run_event_pb2.STEP_KIND_REPLAN]
    assert [e.step_id for e in replans] == ["s3"]
    # The replan was told why the call did not happen.
    replan_request = next(r for r in script.generate_requests if r.metadata.step_id == "s3")
    assert "not this month" in replan_request.messages[-1].parts[0].text.text
    approved = [e.tool_call_approved for e in run_events if e.HasField("tool_call_approved")]
    assert [(a.approved, a.reason) for a in approved] == [(False, "not this month")]
    assert error_details(not_pending.value).reason == "APPROVAL_NOT_PENDING"


async def test_an_expired_approval_denies_and_a_cancelled_run_cancels_its_approval(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    script = Script(
        plans={
            "s1": plan_text(tool_step(GATED, {"amount": 5})),
            "s3": plan_text(tool_step("calculator", {"expression": "6*7"})),
        }
    )
    async with gated_downstreams(script) as (ds, gate):
        settings = settings_for(redis_url, ds)
        policy = agent_pb2.ApprovalPolicy(all_tools=True)
        async with api_server(settings) as api:
            await api.create_agent(tools=(GATED, "calculator"), approval_policy=policy)
            await start_worker(workers, settings, tmp_path, redis_client, "w")
            run_id = (await api.submit(text="pay 5")).run.run_id
            doomed = (await api.submit(text="pay 6")).run.run_id
            for waiting_run in (run_id, doomed):
                await wait_for(
                    lambda r=waiting_run: status_is(api, r, WAITING),  # type: ignore[misc]
                    what="the runs to wait",
                )
            approval_id = (await pending(api, run_id))[0].approval_id
            first_page = await api.runs.ListApprovals(
                pb.ListApprovalsRequest(page_size=1), metadata=api.md()
            )
            second_page = await api.runs.ListApprovals(
                pb.ListApprovalsRequest(page_size=1, page_token=first_page.next_page_token),
                metadata=api.md(),
            )
            other_user = await api.runs.ListApprovals(
                pb.ListApprovalsRequest(), metadata=api.md(user_id="user-b")
            )
            with pytest.raises(grpc.aio.AioRpcError) as bad_token:
                await api.runs.ListApprovals(
                    pb.ListApprovalsRequest(run_id=run_id, page_token=first_page.next_page_token),
                    metadata=api.md(),
                )
            # Its expiry comes now: the workers' sweeper denies it as expired.
            await redis_client.zadd("fdorch:approvals:due:{e}", {approval_id: 0}, xx=True)

            async def replanned() -> bool:
                now = [a.approval_id for a in await pending(api, run_id)]
                return len(now) == 1 and now[0] != approval_id

            # The replanned calculator call needs approval too (all tools): the run waits again.
            await wait_for(replanned, within=60, what="the run to replan and wait again")
            second = await pending(api, run_id)
            expired = await api.runs.ListApprovals(
                pb.ListApprovalsRequest(
                    run_id=run_id, statuses=[approval_pb2.APPROVAL_STATUS_EXPIRED]
                ),
                metadata=api.md(),
            )
            with pytest.raises(grpc.aio.AioRpcError) as too_late:
                await resolve(api, approval_id, APPROVE)
            await api.runs.CancelRun(pb.CancelRunRequest(run_id=doomed), metadata=api.md())
            cancelled = await api.runs.ListApprovals(
                pb.ListApprovalsRequest(statuses=[approval_pb2.APPROVAL_STATUS_CANCELLED]),
                metadata=api.md(),
            )
            still_pending = await pending(api)
            entries = await journal(redis_client, run_id)

    paged = [a.run_id for a in [*first_page.approvals, *second_page.approvals]]
    assert sorted(paged) == sorted([run_id, doomed])
    assert second_page.next_page_token == ""
    assert list(other_user.approvals) == []
    assert error_details(bad_token.value).reason == "PAGE_TOKEN_INVALID"
    assert [a.approval_id for a in expired.approvals] == [approval_id]
    assert expired.approvals[0].status == approval_pb2.APPROVAL_STATUS_EXPIRED
    assert second[0].step_id == "s3.1"
    assert second[0].tool_call.tool_name == "calculator"
    assert error_details(too_late.value).reason == "APPROVAL_NOT_PENDING"
    assert dict(error_details(too_late.value).metadata)["status"] == "APPROVAL_STATUS_EXPIRED"
    final = [e for e in entries if e.step_id == "s1.1"][-1]
    assert final.error.reason == "APPROVAL_EXPIRED"
    assert [a.run_id for a in cancelled.approvals] == [doomed]
    assert [a.run_id for a in still_pending] == [run_id]
    assert sum(gate.calls.values()) == 0
