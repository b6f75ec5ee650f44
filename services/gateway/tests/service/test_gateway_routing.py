"""Routing: resumable event streams, deadlines and principals forwarded, errors mapped."""

from __future__ import annotations

import uuid

import grpc
import pytest

from foredeck.common.v1 import usage_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck_gateway.testing import Gateway, bearer, eventually, make_jwt
from foredeck_kit.errors import error_details


async def _start(gateway: Gateway) -> tuple[tuple[tuple[str, str], ...], str]:
    md = bearer(make_jwt(scope="runs:create runs:read runs:cancel"))
    created = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="task", request_id=uuid.uuid4().hex), metadata=md, timeout=5
    )
    return md, created.run.run_id


async def test_watch_resumes_after_a_dropped_connection_without_loss_or_repeat(
    gateway: Gateway,
) -> None:
    md, run_id = await _start(gateway)
    orchestrator = gateway.orchestrator
    await orchestrator.tokens(run_id, *(f"t{i}" for i in range(10)))
    received: list[int] = []
    first = gateway.api.WatchRun(gw.WatchRunRequest(run_id=run_id), metadata=md)
    last = ""
    for _ in range(4):
        message = await first.read()
        received.append(message.event.sequence)
        last = message.event.event_id
    first.cancel()  # the client's connection drops mid-stream
    # More happens while nobody watches; then the orchestrator breaks every stream after 3.
    await orchestrator.tokens(run_id, *(f"u{i}" for i in range(5)))
    orchestrator.break_streams_after = 3
    broken = gateway.api.WatchRun(
        gw.WatchRunRequest(run_id=run_id, after_event_id=last), metadata=md
    )

    async def read_until_broken() -> None:
        nonlocal last
        async for message in broken:
            received.append(message.event.sequence)
            last = message.event.event_id

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await read_until_broken()
    assert error_details(failure.value).reason == "ORCHESTRATOR_UNAVAILABLE"
    orchestrator.break_streams_after = None
    await orchestrator.finish(run_id, usage_pb2.Usage(input_tokens=5))
    resumed = gateway.api.WatchRun(
        gw.WatchRunRequest(run_id=run_id, after_event_id=last), metadata=md
    )
    async for message in resumed:
        received.append(message.event.sequence)
    total = len(orchestrator.runs[run_id].events)
    assert received == list(range(1, total + 1))


async def test_deadline_and_principal_reach_the_orchestrator(gateway: Gateway) -> None:
    md, run_id = await _start(gateway)
    await gateway.api.GetRun(gw.GetRunRequest(run_id=run_id), metadata=md, timeout=3)
    seen = [c for c in gateway.orchestrator.calls if c.method == "GetRun"][-1]
    assert seen.time_remaining is not None
    assert 0 < seen.time_remaining <= 3
    assert (seen.principal.tenant_id, seen.principal.user_id) == ("acme", "jo")
    assert seen.principal.has("runs:read")
    assert not seen.principal.has("agents:write")


async def test_bad_input_matrix_never_reaches_the_orchestrator(gateway: Gateway) -> None:
    md = bearer(make_jwt(scope="runs:create runs:read runs:cancel approvals:resolve"))
    cases = [
        (
            gateway.api.CreateRun(gw.CreateRunRequest(input="", request_id="a"), metadata=md),
            "INVALID_REQUEST",
        ),
        (
            gateway.api.CreateRun(gw.CreateRunRequest(input="x", request_id=""), metadata=md),
            "INVALID_REQUEST",
        ),
        (
            gateway.api.CreateRun(
                gw.CreateRunRequest(input="x" * (256 * 1024 + 1), request_id="b"), metadata=md
            ),
            "REQUEST_TOO_LARGE",
        ),
        (
            gateway.api.CreateRun(
                gw.CreateRunRequest(
                    input="x", request_id="c", budget=usage_pb2.Budget(max_tokens=-1)
                ),
                metadata=md,
            ),
            "BUDGET_INVALID",
        ),
        (gateway.api.GetRun(gw.GetRunRequest(run_id=""), metadata=md), "INVALID_REQUEST"),
        (gateway.api.ListRuns(gw.ListRunsRequest(page_size=-1), metadata=md), "INVALID_REQUEST"),
        (
            gateway.api.ListRuns(gw.ListRunsRequest(include_all_users=True), metadata=md),
            "PERMISSION_MISSING",
        ),
        (
            gateway.api.ResolveApproval(gw.ResolveApprovalRequest(approval_id="a1"), metadata=md),
            "INVALID_REQUEST",
        ),
    ]
    for call, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        details = error_details(caught.value)
        assert details.reason == reason
        assert details.domain == "gateway.foredeck.dev"
    assert gateway.orchestrator.calls == []
    # An unknown run is NOT_FOUND, mapped from the orchestrator with its reason kept.
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await gateway.api.GetRun(gw.GetRunRequest(run_id="run-999999"), metadata=md, timeout=5)
    details = error_details(unknown.value)
    assert (details.code, details.reason, details.metadata["upstreamReason"]) == (
        grpc.StatusCode.NOT_FOUND,
        "RUN_NOT_FOUND",
        "RUN_NOT_FOUND",
    )
    assert details.metadata["upstreamDomain"] == "orchestrator.foredeck.dev"


async def test_oversize_message_is_refused_by_grpc(gateway: Gateway) -> None:
    md = bearer(make_jwt(scope="runs:create"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.api.CreateRun(
            gw.CreateRunRequest(input="x" * (5 * 1024 * 1024), request_id="big"),
            metadata=md,
            timeout=5,
        )
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gateway.orchestrator.calls == []


async def test_whoami_and_replay_and_cancel(gateway: Gateway) -> None:
    md, run_id = await _start(gateway)
    who = await gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=md, timeout=5)
    assert (who.principal.tenant_id, who.principal.user_id) == ("acme", "jo")
    assert who.active_run_count == 1
    cancelled = await gateway.api.CancelRun(gw.CancelRunRequest(run_id=run_id), metadata=md)
    assert cancelled.run.run_id == run_id
    replay = await gateway.api.ReplayRun(gw.ReplayRunRequest(run_id=run_id), metadata=md)
    assert replay.identical


async def test_orchestrator_down_is_mapped_and_the_reservation_waits_for_the_sweeper(
    gateway: Gateway,
) -> None:
    md = bearer(make_jwt(scope="runs:create runs:read"))
    await gateway.orchestrator.stop()
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await gateway.api.CreateRun(
            gw.CreateRunRequest(input="x", request_id="maybe"), metadata=md, timeout=5
        )
    details = error_details(down.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "ORCHESTRATOR_UNAVAILABLE",
    )
    assert details.retry_after is not None
    state = gateway.host.state
    assert state is not None
    # The run may have been accepted: its reservation is held, not released...
    assert await state.active_runs("acme", "jo") == 1
    with pytest.raises(grpc.aio.AioRpcError) as read:
        await gateway.api.GetRun(gw.GetRunRequest(run_id="run-1"), metadata=md, timeout=5)
    assert error_details(read.value).reason == "ORCHESTRATOR_UNAVAILABLE"
    # ...until its submission grace is over, when the sweeper releases it.
    async for name in state.redis.scan_iter("gw:res:*"):
        await state.redis.hset(name, "created_ms", "1")
        await state.redis.zadd("gw:leases", {name.decode().rpartition(":")[2]: 0})

    async def released() -> bool:
        return await state.active_runs("acme", "jo") == 0

    await eventually(released)


async def test_fork_is_admitted_like_a_new_run(gateway: Gateway) -> None:
    secret, _ = await gateway.new_key(rate_limits={"max_concurrent_runs": 1})
    md = bearer(secret)
    source = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="task", request_id="src"), metadata=md, timeout=5
    )
    # The user is at its cap while the source runs: a fork is refused like a new run.
    with pytest.raises(grpc.aio.AioRpcError) as capped:
        await gateway.api.ForkRun(
            gw.ForkRunRequest(run_id=source.run.run_id, from_step_index=1, request_id="fork"),
            metadata=md,
            timeout=5,
        )
    assert error_details(capped.value).reason == "CONCURRENCY_LIMITED"
    await gateway.orchestrator.finish(source.run.run_id, usage_pb2.Usage(output_tokens=3))
    state = gateway.host.state
    assert state is not None

    async def freed() -> bool:
        return await state.active_runs("acme", "jo") == 0

    await eventually(freed)
    fork = await gateway.api.ForkRun(
        gw.ForkRunRequest(run_id=source.run.run_id, from_step_index=1, request_id="fork"),
        metadata=md,
        timeout=5,
    )
    assert fork.created
    assert fork.run.forked_from_run_id == source.run.run_id
    assert await state.active_runs("acme", "jo") == 1
