"""Admin: the bootstrap credentials, budgets (mask, etag, reset) and paged listings."""

from __future__ import annotations

import asyncio
import io
import json
import stat
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from foredeck.gateway.v1 import budget_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.testing import Gateway, bearer, running_gateway
from foredeck_kit.errors import error_details
from foredeck_kit.logs import flush_logging, reset_logging
from foredeck_kit.telemetry import setup_telemetry

TENANT = budget_pb2.BUDGET_SCOPE_TENANT


async def test_first_start_writes_private_credentials_that_work(
    redis_url: str, tmp_path: Path
) -> None:
    logs = io.StringIO()
    telemetry = setup_telemetry(
        "gateway", GatewaySettings(metrics_port=-1), environ={}, set_global=False, log_stream=logs
    )
    try:
        async with running_gateway(redis_url, telemetry=telemetry, data_dir=tmp_path) as gateway:
            path = tmp_path / "credentials.json"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            document = json.loads(path.read_text())
            admin = bearer(document["admin"]["secret"])
            developer = bearer(document["developer"]["secret"])
            listed = await gateway.admin.ListApiKeys(
                gw.ListApiKeysRequest(tenant_id="local"), metadata=admin, timeout=5
            )
            assert [k.api_key_id for k in listed.api_keys] == ["key_bootstrap_developer"]
            created = await gateway.api.CreateRun(
                gw.CreateRunRequest(input="hello", request_id="dev-1"), metadata=developer
            )
            assert created.run.tenant_id == "local"
        # A second start keeps the same file and the same keys.
        async with running_gateway(redis_url, telemetry=telemetry, data_dir=tmp_path) as gateway:
            assert json.loads(path.read_text()) == document
            who = await gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=developer, timeout=5)
            assert who.principal.user_id == "developer"
    finally:
        telemetry.shutdown()
        flush_logging()
        reset_logging()
    for entry in document.values():
        assert entry["secret"] not in logs.getvalue()
    assert "credentials file ready" in logs.getvalue()


async def test_budget_mask_etag_and_reset(gateway: Gateway) -> None:
    md = gateway.admin_md
    first = (
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(
                tenant_id="acme",
                scope=TENANT,
                token_limit=1000,
                period=budget_pb2.BUDGET_PERIOD_DAILY,
            ),
            metadata=md,
        )
    ).budget
    assert (first.budget_id, first.token_limit, first.period) == (
        "tenant",
        1000,
        budget_pb2.BUDGET_PERIOD_DAILY,
    )
    assert first.HasField("period_end_time")
    # An empty mask names only the populated fields: the token limit stays.
    second = (
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(tenant_id="acme", scope=TENANT, cost_limit_usd_micros=5),
            metadata=md,
        )
    ).budget
    assert (second.token_limit, second.cost_limit_usd_micros) == (1000, 5)
    cleared = (
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(
                tenant_id="acme",
                scope=TENANT,
                update_mask=field_mask_pb2.FieldMask(paths=["token_limit"]),
                etag=second.etag,
            ),
            metadata=md,
        )
    ).budget
    assert cleared.token_limit == 0
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(tenant_id="acme", scope=TENANT, token_limit=1, etag=second.etag),
            metadata=md,
        )
    assert error_details(stale.value).reason == "ETAG_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as bad_path:
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(
                tenant_id="acme",
                scope=TENANT,
                update_mask=field_mask_pb2.FieldMask(paths=["spent_tokens"]),
            ),
            metadata=md,
        )
    assert error_details(bad_path.value).reason == "INVALID_REQUEST"
    state = gateway.host.state
    assert state is not None
    await state.redis.hset("gw:b:acme:tenant", "spent_t", "40")
    reset = await gateway.admin.ResetBudgetSpend(
        gw.ResetBudgetSpendRequest(tenant_id="acme", scope=TENANT, request_id="reset-1"),
        metadata=md,
    )
    assert (reset.reset_tokens, reset.budget.spent_tokens, reset.replayed) == (40, 0, False)
    await state.redis.hset("gw:b:acme:tenant", "spent_t", "7")
    again = await gateway.admin.ResetBudgetSpend(
        gw.ResetBudgetSpendRequest(tenant_id="acme", scope=TENANT, request_id="reset-1"),
        metadata=md,
    )
    assert (again.reset_tokens, again.replayed, again.budget.spent_tokens) == (40, True, 7)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await gateway.admin.GetBudget(
            gw.GetBudgetRequest(
                tenant_id="acme", scope=budget_pb2.BUDGET_SCOPE_USER, user_id="nobody"
            ),
            metadata=md,
        )
    assert error_details(missing.value).reason == "BUDGET_NOT_FOUND"


async def test_listings_page_through_everything_once(gateway: Gateway) -> None:
    made = {(await gateway.new_key(user=f"u{i}"))[1].api_key_id for i in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = await gateway.admin.ListApiKeys(
            gw.ListApiKeysRequest(tenant_id="acme", page_size=2, page_token=token),
            metadata=gateway.admin_md,
        )
        seen.extend(k.api_key_id for k in page.api_keys)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(made)
    for index in range(3):
        await gateway.admin.SetBudget(
            gw.SetBudgetRequest(
                tenant_id="acme",
                scope=budget_pb2.BUDGET_SCOPE_USER,
                user_id=f"u{index}",
                token_limit=10,
            ),
            metadata=gateway.admin_md,
        )
    budgets: list[str] = []
    token = ""
    while True:
        page = await gateway.admin.ListBudgets(
            gw.ListBudgetsRequest(tenant_id="acme", page_size=2, page_token=token),
            metadata=gateway.admin_md,
        )
        budgets.extend(b.budget_id for b in page.budgets)
        token = page.next_page_token
        if not token:
            break
    assert budgets == ["user:u0", "user:u1", "user:u2"]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await gateway.admin.ListBudgets(
            gw.ListBudgetsRequest(page_token="garbage"), metadata=gateway.admin_md
        )
    assert error_details(bad.value).reason == "PAGE_TOKEN_INVALID"


async def test_concurrent_retries_of_create_api_key_make_one_key(gateway: Gateway) -> None:
    request = gw.CreateApiKeyRequest(
        tenant_id="acme", user_id="jo", display_name="ci", request_id="same-key"
    )
    responses = await asyncio.gather(
        *(gateway.admin.CreateApiKey(request, metadata=gateway.admin_md) for _ in range(10))
    )
    assert len({r.api_key.api_key_id for r in responses}) == 1
    assert sum(1 for r in responses if r.secret) == 1
    assert all(r.secret_withheld for r in responses if not r.secret)
    listed = await gateway.admin.ListApiKeys(
        gw.ListApiKeysRequest(tenant_id="acme"), metadata=gateway.admin_md
    )
    assert len(listed.api_keys) == 1
