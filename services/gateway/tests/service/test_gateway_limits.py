"""Limits that must hold across replicas: request rates, budgets, and Redis going away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from foredeck.common.v1 import agent_pb2, usage_pb2
from foredeck.gateway.v1 import budget_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from foredeck_gateway.credentials import hash_secret, new_api_key_secret
from foredeck_gateway.store import KeyRecord, RedisState
from foredeck_gateway.testing import (
    Gateway,
    ScriptedOrchestrator,
    bearer,
    eventually,
    make_jwt,
    running_gateway,
)
from foredeck_kit.errors import error_details
from foredeck_kit.principal import format_keys, generate_key
from foredeck_stack.stores import RedisProcess, free_port


async def _serving(address: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, f"{address} never served"
            await asyncio.sleep(0.1)  # polling a probe, bounded by the deadline above


@contextlib.asynccontextmanager
async def _gateway_process(env: dict[str, str], log: Path) -> AsyncIterator[str]:
    port = free_port()
    env = {**os.environ, **env, "FOREDECK_GATEWAY_PORT": str(port)}
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "foredeck_gateway", env=env, stdout=out, stderr=out
        )
    try:
        await _serving(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.mark.slow
async def test_two_gateway_processes_admit_exactly_the_rate(redis_url: str, tmp_path: Path) -> None:
    keys = {"gw-test": generate_key()}
    orchestrator = ScriptedOrchestrator(keys)
    address = await orchestrator.start()
    redis = Redis.from_url(redis_url)
    secret = new_api_key_secret()
    await RedisState(redis, prefix="gw", timeout=5).create_key(
        KeyRecord(
            api_key_id="key_rate",
            prefix=secret[:12],
            display_name="rate",
            tenant_id="acme",
            user_id="jo",
            kind="user",
            permissions=["runs:read"],
            key_rpm=100,
        ),
        hash_secret(secret),
    )
    await redis.aclose()
    env = {
        "FOREDECK_GATEWAY_REDIS_URL": redis_url,
        "FOREDECK_GATEWAY_ORCHESTRATOR_ADDRESS": address,
        "FOREDECK_GATEWAY_PRINCIPAL_KEYS": format_keys(keys),
        "FOREDECK_GATEWAY_METRICS_PORT": "-1",
        "FOREDECK_GATEWAY_LOG_LEVEL": "warning",
        "FOREDECK_GATEWAY_REDIS_TIMEOUT_SECONDS": "5",
        # Every route fails closed: an admission Redis could not make shows as an error.
        "FOREDECK_GATEWAY_FAIL_OPEN_ROUTES": "[]",
    }
    try:
        async with (
            _gateway_process(env, tmp_path / "a.log") as first,
            _gateway_process(env, tmp_path / "b.log") as second,
        ):
            channels = [grpc.aio.insecure_channel(a) for a in (first, second)]
            stubs = [gw_grpc.GatewayServiceStub(c) for c in channels]
            outcomes: Counter[str] = Counter()
            quota_ok = True

            async def one(index: int) -> None:
                nonlocal quota_ok
                try:
                    await stubs[index % 2].WhoAmI(
                        gw.WhoAmIRequest(), metadata=bearer(secret), timeout=60
                    )
                    outcomes["ok"] += 1
                except grpc.aio.AioRpcError as exc:
                    details = error_details(exc)
                    outcomes[details.reason or exc.code().name] += 1
                    if details.reason == "RATE_LIMITED":
                        quota_ok = quota_ok and bool(details.quota_violations)
                        quota_ok = quota_ok and details.retry_after is not None
                        quota_ok = (
                            quota_ok and details.quota_violations[0].subject == "key:key_rate"
                        )

            await asyncio.gather(*(one(i) for i in range(2000)))
            for channel in channels:
                await channel.close(None)
    finally:
        await orchestrator.stop()
    assert outcomes == Counter({"ok": 100, "RATE_LIMITED": 1900})
    assert quota_ok


async def test_budget_is_never_overspent_by_concurrent_runs(gateway: Gateway) -> None:
    secret, key = await gateway.new_key(
        run_budget=usage_pb2.Budget(max_tokens=1000),
        rate_limits={"max_concurrent_runs": 1000},
    )
    await gateway.admin.SetBudget(
        gw.SetBudgetRequest(
            tenant_id="acme", scope=budget_pb2.BUDGET_SCOPE_TENANT, token_limit=10_500
        ),
        metadata=gateway.admin_md,
    )

    async def create(index: int) -> str:
        try:
            await gateway.api.CreateRun(
                gw.CreateRunRequest(input=f"task {index}", request_id=f"r{index}"),
                metadata=bearer(secret),
                timeout=30,
            )
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return error_details(exc).reason or exc.code().name

    results = Counter(await asyncio.gather(*(create(i) for i in range(60))))
    assert results == Counter({"ok": 10, "BUDGET_EXHAUSTED": 50})
    # The principal the orchestrator got names the budgets charged for the run.
    submitted = [c for c in gateway.orchestrator.calls if c.method == "SubmitRun"]
    assert submitted[-1].principal.budget_ids == ("tenant",)
    budget = (
        await gateway.admin.GetBudget(
            gw.GetBudgetRequest(tenant_id="acme", scope=budget_pb2.BUDGET_SCOPE_TENANT),
            metadata=gateway.admin_md,
        )
    ).budget
    assert (budget.reserved_tokens, budget.reservation_count) == (10_000, 10)
    # Each run really uses 900 tokens; settlement charges that and frees the rest.
    for run_id in list(gateway.orchestrator.runs):
        await gateway.orchestrator.finish(
            run_id, usage_pb2.Usage(input_tokens=600, output_tokens=300)
        )

    async def tenant_budget() -> budget_pb2.BudgetAccount:
        response = await gateway.admin.GetBudget(
            gw.GetBudgetRequest(tenant_id="acme", scope=budget_pb2.BUDGET_SCOPE_TENANT),
            metadata=gateway.admin_md,
        )
        found: budget_pb2.BudgetAccount = response.budget
        return found

    async def settled() -> bool:
        return (await tenant_budget()).reservation_count == 0

    await eventually(settled)
    budget = await tenant_budget()
    assert (budget.spent_tokens, budget.reserved_tokens) == (9000, 0)
    assert budget.spent_tokens <= budget.token_limit
    # 1,500 tokens are left: one more run of 1,000 fits, a second does not.
    results = Counter(await asyncio.gather(*(create(100 + i) for i in range(5))))
    assert results == Counter({"ok": 1, "BUDGET_EXHAUSTED": 4})
    assert key.api_key_id


async def test_concurrency_cap_and_idempotent_create(gateway: Gateway) -> None:
    secret, _ = await gateway.new_key(rate_limits={"max_concurrent_runs": 2})
    md = bearer(secret)
    first = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="a", request_id="one"), metadata=md, timeout=5
    )
    again = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="a", request_id="one"), metadata=md, timeout=5
    )
    assert first.created
    assert not again.created
    assert again.run.run_id == first.run.run_id
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await gateway.api.CreateRun(
            gw.CreateRunRequest(input="b", request_id="one"), metadata=md, timeout=5
        )
    assert error_details(reused.value).reason == "REQUEST_ID_REUSED"
    await gateway.api.CreateRun(gw.CreateRunRequest(input="c", request_id="two"), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as capped:
        await gateway.api.CreateRun(gw.CreateRunRequest(input="d", request_id="three"), metadata=md)
    details = error_details(capped.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "CONCURRENCY_LIMITED",
    )
    assert details.quota_violations[0].subject == "user:jo"
    assert details.retry_after is not None
    # A refused submission leaves nothing reserved behind.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await gateway.api.CreateRun(
            gw.CreateRunRequest(agent_name="missing", input="e", request_id="four"), metadata=md
        )
    assert error_details(missing.value).reason in ("AGENT_NOT_FOUND", "CONCURRENCY_LIMITED")
    await gateway.orchestrator.finish(first.run.run_id)
    state = gateway.host.state
    assert state is not None

    async def freed() -> bool:
        return await state.active_runs("acme", "jo") == 1

    await eventually(freed)
    created = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="f", request_id="five"), metadata=md
    )
    assert created.created


async def test_sweeper_releases_reservations_of_crashed_work(redis_url: str) -> None:
    async with running_gateway(
        redis_url, submit_grace_seconds=5, reservation_lease_seconds=5
    ) as gateway:
        state = gateway.host.state
        assert state is not None
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(
                tenant_id="acme", scope=budget_pb2.BUDGET_SCOPE_TENANT, token_limit=100
            ),
            metadata=gateway.admin_md,
        )
        # A replica that reserved and then died before submitting: its reservation is orphaned.
        admitted = await state.admit(
            op="run",
            tenant_id="acme",
            user_id="jo",
            defaults=(100, 100, 100, 5),
            reservation_id="crashed",
            request_id="lost",
            fingerprint="f",
            run_caps=(60, 0),
            lease_ms=1,
        )
        assert getattr(admitted, "reservation", "") == "new"
        await state.redis.hset("gw:res:crashed", "created_ms", "1")

        async def released() -> bool:
            return await state.active_runs("acme", "jo") == 0

        await eventually(released)
        budget = await state.get_budget("acme", "tenant")
        assert budget is not None
        assert (budget.reserved_tokens, budget.spent_tokens) == (0, 0)


async def test_redis_down_fails_closed_and_open_within_the_deadline(tmp_path: Path) -> None:
    async with (
        RedisProcess(tmp_path / "redis") as redis_server,
        running_gateway(
            redis_server.url, fail_open_routes="GetRun,WhoAmI", redis_timeout_seconds=0.2
        ) as gateway,
    ):
        token = bearer(make_jwt(scope="runs:read runs:create"))
        created = await gateway.api.CreateRun(
            gw.CreateRunRequest(input="x", request_id="before"), metadata=token, timeout=5
        )
        await redis_server.stop()
        got = await gateway.api.GetRun(
            gw.GetRunRequest(run_id=created.run.run_id), metadata=token, timeout=2
        )
        assert got.run.run_id == created.run.run_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.api.CreateRun(
                gw.CreateRunRequest(input="y", request_id="after"), metadata=token, timeout=2
            )
        details = error_details(refused.value)
        assert (details.code, details.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "RATE_LIMITER_UNAVAILABLE",
        )
        assert details.metadata["route"].endswith("/CreateRun")
        with pytest.raises(grpc.aio.AioRpcError) as listed:
            await gateway.api.ListRuns(gw.ListRunsRequest(), metadata=token, timeout=2)
        assert error_details(listed.value).reason == "RATE_LIMITER_UNAVAILABLE"


async def test_default_reservation_never_loosens_the_agents_cap(gateway: Gateway) -> None:
    md = bearer(make_jwt(scope="runs:create agents:write"))
    await gateway.api.CreateAgent(
        gw.CreateAgentRequest(
            agent=agent_pb2.Agent(name="small", budget=usage_pb2.Budget(max_tokens=500)),
            request_id="agent-1",
        ),
        metadata=md,
        timeout=5,
    )
    await gateway.admin.SetBudget(
        gw.SetBudgetRequest(
            tenant_id="acme", scope=budget_pb2.BUDGET_SCOPE_TENANT, token_limit=10**6
        ),
        metadata=gateway.admin_md,
    )
    created = await gateway.api.CreateRun(
        gw.CreateRunRequest(agent_name="small", input="x", request_id="small-1"),
        metadata=md,
        timeout=5,
    )
    # The default reservation is held; the run is submitted with the agent's tighter cap.
    assert created.run.budget.max_tokens == 500
    state = gateway.host.state
    assert state is not None
    budget = await state.get_budget("acme", "tenant")
    assert budget is not None
    assert budget.reserved_tokens == gateway.settings.default_run_tokens


async def test_sweeper_settles_finished_runs_from_their_usage(redis_url: str) -> None:
    async with running_gateway(redis_url, watch_runs=False) as gateway:
        state = gateway.host.state
        assert state is not None
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(
                tenant_id="acme", scope=budget_pb2.BUDGET_SCOPE_TENANT, token_limit=10_000
            ),
            metadata=gateway.admin_md,
        )
        md = bearer(make_jwt(scope="runs:create"))
        created = await gateway.api.CreateRun(
            gw.CreateRunRequest(
                input="x", request_id="swept", budget=usage_pb2.Budget(max_tokens=2000)
            ),
            metadata=md,
            timeout=5,
        )
        await gateway.orchestrator.finish(
            created.run.run_id, usage_pb2.Usage(input_tokens=700, cost_usd_micros=9)
        )
        # Nobody watches the run: its lease falls due and the sweeper asks the orchestrator.
        members: list[Any] = await state.redis.zrange("gw:leases", 0, -1)
        await state.redis.zadd("gw:leases", dict.fromkeys(members, 0))

        async def settled() -> bool:
            budget = await state.get_budget("acme", "tenant")
            return budget is not None and budget.reservation_count == 0

        await eventually(settled)
        budget = await state.get_budget("acme", "tenant")
        assert budget is not None
        assert (budget.spent_tokens, budget.reserved_tokens) == (700, 0)
        assert await state.active_runs("acme", "jo") == 0


async def test_large_amounts_stay_exact(gateway: Gateway) -> None:
    await gateway.admin.SetBudget(
        gw.SetBudgetRequest(
            tenant_id="acme",
            scope=budget_pb2.BUDGET_SCOPE_TENANT,
            token_limit=10**15,
            cost_limit_usd_micros=10**15,
        ),
        metadata=gateway.admin_md,
    )
    md = bearer(make_jwt(scope="runs:create"))
    cap = 10**15 - 1
    created = await gateway.api.CreateRun(
        gw.CreateRunRequest(
            input="x",
            request_id="big",
            budget=usage_pb2.Budget(max_tokens=cap, max_cost_usd_micros=cap),
        ),
        metadata=md,
        timeout=5,
    )
    assert created.run.budget.max_tokens == cap
    state = gateway.host.state
    assert state is not None
    budget = await state.get_budget("acme", "tenant")
    assert budget is not None
    assert (budget.reserved_tokens, budget.reserved_cost) == (cap, cap)
    await gateway.orchestrator.finish(
        created.run.run_id, usage_pb2.Usage(input_tokens=cap - 5, cost_usd_micros=cap - 7)
    )

    async def settled() -> bool:
        current = await state.get_budget("acme", "tenant")
        return current is not None and current.reservation_count == 0

    await eventually(settled)
    budget = await state.get_budget("acme", "tenant")
    assert budget is not None
    assert (budget.spent_tokens, budget.spent_cost, budget.reserved_tokens) == (cap - 5, cap - 7, 0)
