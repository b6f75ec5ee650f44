"""Pure pieces of the runtime: key slots, the priority schedule, budgets and page tokens."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from foredeck.common.v1 import usage_pb2
from foredeck_kit.errors import ServiceError
from foredeck_orchestrator.adapters.keys import Keys, run_id_for
from foredeck_orchestrator.runtime import Worker
from foredeck_orchestrator.validation import (
    check_run_id,
    decode_page_token,
    encode_page_token,
    narrow_budget,
)


def _tag(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


def test_one_run_s_keys_share_a_cluster_slot() -> None:
    keys = Keys()
    run_id = run_id_for("tenant-a", "req-1")
    tags = {_tag(k) for k in (keys.run(run_id), keys.journal(run_id), keys.events(run_id))}
    assert tags == {run_id}
    assert _tag(keys.global_slots) == _tag(keys.user_slots("u"))
    assert run_id_for("tenant-a", "req-1") == run_id
    assert run_id_for("tenant-b", "req-1") != run_id


def test_the_weighted_schedule_gives_every_queue_its_share() -> None:
    order = Worker._weighted_schedule((4, 2, 1))
    assert len(order) == 7
    assert (order.count("high"), order.count("normal"), order.count("low")) == (4, 2, 1)
    assert order[0] == "high"
    # Smooth: high never runs more than twice in a row.
    assert "high,high,high" not in ",".join(order)


def test_a_run_budget_only_tightens_the_agent_s() -> None:
    agent = usage_pb2.Budget(max_steps=10, max_tokens=1000, max_wall_time=Duration(seconds=60))
    tighter = narrow_budget(agent, usage_pb2.Budget(max_steps=5, max_cost_usd_micros=7))
    assert (tighter.max_steps, tighter.max_tokens, tighter.max_cost_usd_micros) == (5, 1000, 7)
    assert tighter.max_wall_time.seconds == 60
    for looser in (
        usage_pb2.Budget(max_steps=11),
        usage_pb2.Budget(max_wall_time=Duration(seconds=61)),
        usage_pb2.Budget(max_tokens=-1),
    ):
        with pytest.raises(ServiceError) as caught:
            narrow_budget(agent, looser)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.reason == "BUDGET_INVALID"


def test_page_tokens_belong_to_their_query() -> None:
    token = encode_page_token("query-a", 40)
    assert decode_page_token(token, "query-a") == 40
    assert decode_page_token("", "query-a") is None
    for bad in (token + "x", "not-a-token", encode_page_token("query-b", 40)):
        with pytest.raises(ServiceError) as caught:
            decode_page_token(bad, "query-a")
        assert caught.value.reason == "PAGE_TOKEN_INVALID"


def test_a_malformed_run_id_names_no_run() -> None:
    with pytest.raises(ServiceError) as caught:
        check_run_id("r_../../etc")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ServiceError) as empty:
        check_run_id("")
    assert empty.value.reason == "INVALID_REQUEST"
