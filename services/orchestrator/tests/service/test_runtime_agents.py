"""AgentService and run listing over real Redis and real gRPC."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from foredeck.common.v1 import agent_pb2, run_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck_kit.errors import error_details
from services.orchestrator.tests.service.runtime_support import (
    api_server,
    downstreams,
    settings_for,
)


async def test_agents_are_versioned_and_runs_stay_pinned(redis_url: str) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            md = api.md()
            request_id = uuid.uuid4().hex
            first = agent_pb2.Agent(name="helper", model="m1", system_prompt="one")
            created = await api.agents.CreateAgent(
                pb.CreateAgentRequest(agent=first, request_id=request_id), metadata=md
            )
            again = await api.agents.CreateAgent(
                pb.CreateAgentRequest(agent=first, request_id=request_id), metadata=md
            )
            run = (await api.submit()).run
            v2 = await api.agents.CreateAgentVersion(
                pb.CreateAgentVersionRequest(
                    agent=agent_pb2.Agent(name="helper", system_prompt="two"),
                    request_id=uuid.uuid4().hex,
                    etag=created.agent.etag,
                ),
                metadata=md,
            )
            with pytest.raises(grpc.aio.AioRpcError) as stale:
                await api.agents.CreateAgentVersion(
                    pb.CreateAgentVersionRequest(
                        agent=agent_pb2.Agent(name="helper", model="m3"),
                        request_id=uuid.uuid4().hex,
                        etag=created.agent.etag,
                    ),
                    metadata=md,
                )
            cleared = await api.agents.CreateAgentVersion(
                pb.CreateAgentVersionRequest(
                    agent=agent_pb2.Agent(name="helper"),
                    request_id=uuid.uuid4().hex,
                    update_mask=FieldMask(paths=["model"]),
                ),
                metadata=md,
            )
            versions = await api.agents.ListAgentVersions(
                pb.ListAgentVersionsRequest(agent_name="helper", page_size=2), metadata=md
            )
            rest = await api.agents.ListAgentVersions(
                pb.ListAgentVersionsRequest(
                    agent_name="helper", page_size=2, page_token=versions.next_page_token
                ),
                metadata=md,
            )
            pinned = await api.run(run.run_id)
            deleted = await api.agents.DeleteAgent(
                pb.DeleteAgentRequest(agent_name="helper"), metadata=md
            )
            with pytest.raises(grpc.aio.AioRpcError) as archived:
                await api.submit()
            listed = await api.agents.ListAgents(pb.ListAgentsRequest(), metadata=md)
            with_archived = await api.agents.ListAgents(
                pb.ListAgentsRequest(include_archived=True), metadata=md
            )
            other_tenant = await api.agents.ListAgents(
                pb.ListAgentsRequest(include_archived=True), metadata=api.md(tenant_id="t-b")
            )
    assert created.agent.version == 1
    assert again.agent == created.agent
    assert (v2.agent.version, v2.agent.model, v2.agent.system_prompt) == (2, "m1", "two")
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert error_details(stale.value).reason == "ETAG_MISMATCH"
    assert (cleared.agent.version, cleared.agent.model) == (3, "")
    assert [a.version for a in versions.agents] == [3, 2]
    assert [a.version for a in rest.agents] == [1]
    assert rest.next_page_token == ""
    assert pinned.agent_version == 1
    assert deleted.agent.state == agent_pb2.AGENT_STATE_ARCHIVED
    assert error_details(archived.value).reason == "AGENT_ARCHIVED"
    assert listed.agents == []
    assert [a.name for a in with_archived.agents] == ["helper"]
    assert other_tenant.agents == []


async def test_list_runs_pages_filters_and_keeps_users_apart(redis_url: str) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent()
            mine = [(await api.submit(labels={"batch": str(i % 2)})).run.run_id for i in range(5)]
            theirs = await api.runs.SubmitRun(
                pb.SubmitRunRequest(agent_name="helper", input="x", request_id="other-1"),
                metadata=api.md(user_id="user-b"),
            )
            pages: list[str] = []
            # Pages of two walk the five runs of this user.
            token = ""
            while True:
                page = await api.runs.ListRuns(
                    pb.ListRunsRequest(page_size=2, page_token=token), metadata=api.md()
                )
                pages += [r.run_id for r in page.runs]
                token = page.next_page_token
                if not token:
                    break
            labelled = await api.runs.ListRuns(
                pb.ListRunsRequest(labels={"batch": "1"}), metadata=api.md()
            )
            everyone = await api.runs.ListRuns(
                pb.ListRunsRequest(include_all_users=True), metadata=api.md()
            )
            queued = await api.runs.ListRuns(
                pb.ListRunsRequest(statuses=[run_pb2.RUN_STATUS_SUCCEEDED]), metadata=api.md()
            )
            with pytest.raises(grpc.aio.AioRpcError) as bad_token:
                await api.runs.ListRuns(pb.ListRunsRequest(page_token="bogus"), metadata=api.md())
    # Every run once across the pages, newest first (runs of one millisecond in any order).
    assert sorted(pages) == sorted(mine)
    assert pages[0] in mine[-2:]
    assert sorted(r.run_id for r in labelled.runs) == sorted([mine[1], mine[3]])
    assert theirs.run.run_id in [r.run_id for r in everyone.runs]
    assert len(everyone.runs) == 6
    assert queued.runs == []
    assert error_details(bad_token.value).reason == "PAGE_TOKEN_INVALID"
