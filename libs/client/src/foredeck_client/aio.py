"""The asynchronous Foredeck client (``grpc.aio``) over the gateway's public contract.

::

    from foredeck_client.aio import AsyncClient

    async with AsyncClient() as client:  # finds the local stack, or FOREDECK_ADDRESS/_API_KEY
        run = await client.create_run("What is 17 * 23? Use the calculator.")
        async for event in client.watch_run(run.run_id):
            ...
        run = await client.get_run(run.run_id)
        print(run.output)

Every method raises a :class:`~foredeck_client.errors.ForedeckError` subclass on failure.
Writes carry a request id (a fresh UUID unless the caller passes one), so the client retries
them safely on UNAVAILABLE; :meth:`AsyncClient.watch_run` resumes after a dropped stream by
itself, from the last event it delivered, without losing or repeating one.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import field_mask_pb2

from foredeck.common.v1 import (
    agent_pb2,
    approval_pb2,
    journal_pb2,
    run_event_pb2,
    run_pb2,
    usage_pb2,
)
from foredeck.gateway.v1 import api_key_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from foredeck_client.connection import Connection, resolve_connection
from foredeck_client.errors import error_from_rpc

__all__ = ["AsyncClient", "Page"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# A stream the server or a proxy cut: resume from the last event.
_STREAM_BROKEN = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


class Page(list[T]):
    """One page of a listing: the items, and the token of the next page ("" on the last)."""

    next_page_token: str

    def __init__(self, items: Iterable[T], next_page_token: str) -> None:
        super().__init__(items)
        self.next_page_token = next_page_token


def _request_id(given: str | None) -> str:
    return given or uuid.uuid4().hex


class AsyncClient:
    """A connection to a Foredeck gateway; open one per process and share it."""

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        data_dir: Path | None = None,
        role: str = "developer",
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        watch_reconnects: int = 20,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """``address``/``api_key`` default to the environment or the local stack (see
        :mod:`foredeck_client.connection`); ``timeout`` bounds each unary call, ``retries``
        how often a call that found the gateway unavailable is repeated, ``watch_reconnects``
        how often a watch stream is resumed in a row without receiving an event."""
        self.connection: Connection = resolve_connection(
            address, api_key, data_dir=data_dir, role=role
        )
        self.timeout = timeout
        self.retries = retries
        self.watch_reconnects = watch_reconnects
        self._metadata = (("authorization", f"Bearer {self.connection.api_key}"),)
        if channel is None:
            if self.connection.tls:
                channel = grpc.aio.secure_channel(
                    self.connection.address,
                    grpc.ssl_channel_credentials(),
                    options=_CHANNEL_OPTIONS,
                )
            else:
                channel = grpc.aio.insecure_channel(
                    self.connection.address, options=_CHANNEL_OPTIONS
                )
        self._channel = channel
        self.gateway = gw_grpc.GatewayServiceStub(channel)
        """The raw stub, for calls this client does not wrap (send ``self.metadata``)."""
        self.admin = gw_grpc.AdminServiceStub(channel)
        """The operators' AdminService stub (needs an admin credential)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the credential."""
        return self._metadata

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def _call(self, call: Callable[..., Awaitable[T]], request: object) -> T:
        """One unary call with the credential and timeout, retried while UNAVAILABLE."""
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return await call(request, metadata=self._metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as error:
                typed = error_from_rpc(error)
                if error.code() not in _RETRYABLE or attempt == self.retries:
                    raise typed from None
                wait = typed.retry_after if typed.retry_after is not None else delay
                await asyncio.sleep(wait * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")  # pragma: no cover

    # identity

    async def who_am_i(self) -> gw.WhoAmIResponse:
        """The caller's tenant, user, permissions, limits and budgets as the gateway sees them."""
        return await self._call(self.gateway.WhoAmI, gw.WhoAmIRequest())

    # runs

    async def create_run(
        self,
        input: str,
        *,
        agent: str = "",
        agent_version: int = 0,
        priority: run_pb2.Priority.ValueType = run_pb2.PRIORITY_UNSPECIFIED,
        labels: Mapping[str, str] | None = None,
        budget: usage_pb2.Budget | None = None,
        request_id: str | None = None,
    ) -> run_pb2.Run:
        """Start a run of ``agent`` (the tenant's ``default`` agent when empty) on ``input``."""
        request = gw.CreateRunRequest(
            agent_name=agent,
            agent_version=agent_version,
            input=input,
            priority=priority,
            labels=dict(labels or {}),
            budget=budget,
            request_id=_request_id(request_id),
        )
        response = await self._call(self.gateway.CreateRun, request)
        return response.run

    async def get_run(self, run_id: str) -> run_pb2.Run:
        """The run as it is now."""
        response = await self._call(self.gateway.GetRun, gw.GetRunRequest(run_id=run_id))
        return response.run

    async def list_runs(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        statuses: Iterable[run_pb2.RunStatus.ValueType] = (),
        agent: str = "",
        labels: Mapping[str, str] | None = None,
        parent_run_id: str = "",
        include_all_users: bool = False,
    ) -> Page[run_pb2.Run]:
        """One page of the caller's runs, newest first."""
        request = gw.ListRunsRequest(
            page_size=page_size,
            page_token=page_token,
            statuses=list(statuses),
            agent_name=agent,
            labels=dict(labels or {}),
            parent_run_id=parent_run_id,
            include_all_users=include_all_users,
        )
        response = await self._call(self.gateway.ListRuns, request)
        return Page(response.runs, response.next_page_token)

    async def watch_run(
        self,
        run_id: str,
        *,
        after_event_id: str = "",
        event_types: Iterable[run_event_pb2.RunEventType.ValueType] = (),
    ) -> AsyncIterator[run_event_pb2.RunEvent]:
        """The run's events in order, from after ``after_event_id``, until it finishes.

        A dropped stream is resumed from the last event delivered, so no event is lost or
        repeated; after ``watch_reconnects`` failed resumptions in a row the error is raised.
        """
        last = after_event_id
        failures = 0
        delay = 0.1
        types = list(event_types)
        while True:
            request = gw.WatchRunRequest(run_id=run_id, after_event_id=last, event_types=types)
            stream = self.gateway.WatchRun(request, metadata=self._metadata)
            try:
                async for response in stream:
                    event = response.event
                    last = event.event_id or last
                    failures, delay = 0, 0.1
                    yield event
                    if event.HasField("run_finished"):
                        return
                return  # the server ended the stream: the run finished
            except grpc.aio.AioRpcError as error:
                failures += 1
                if error.code() not in _STREAM_BROKEN or failures > self.watch_reconnects:
                    raise error_from_rpc(error) from None
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 2.0)
            finally:
                stream.cancel()

    async def wait_run(self, run_id: str) -> run_pb2.Run:
        """Wait until the run finishes (following its events) and return it."""
        async for _ in self.watch_run(
            run_id, event_types=[run_event_pb2.RUN_EVENT_TYPE_RUN_FINISHED]
        ):
            pass
        return await self.get_run(run_id)

    async def cancel_run(self, run_id: str, reason: str = "") -> run_pb2.Run:
        """Cancel a run that has not finished (with its sub-agent runs)."""
        request = gw.CancelRunRequest(run_id=run_id, reason=reason)
        response = await self._call(self.gateway.CancelRun, request)
        return response.run

    async def get_run_tree(self, run_id: str) -> gw.GetRunTreeResponse:
        """The run with its sub-agent runs, as a tree."""
        return await self._call(self.gateway.GetRunTree, gw.GetRunTreeRequest(run_id=run_id))

    async def get_run_journal(
        self,
        run_id: str,
        *,
        view: journal_pb2.JournalView.ValueType = journal_pb2.JOURNAL_VIEW_BASIC,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[journal_pb2.JournalEntry]:
        """One page of the run's step journal."""
        request = gw.GetRunJournalRequest(
            run_id=run_id, view=view, page_size=page_size, page_token=page_token
        )
        response = await self._call(self.gateway.GetRunJournal, request)
        return Page(response.entries, response.next_page_token)

    async def replay_run(self, run_id: str, *, strict: bool = False) -> gw.ReplayRunResponse:
        """Re-execute a finished run from its journal, calling no model, tool or memory."""
        request = gw.ReplayRunRequest(run_id=run_id, strict=strict)
        return await self._call(self.gateway.ReplayRun, request)

    async def fork_run(
        self,
        run_id: str,
        from_step_index: int,
        *,
        input: str | None = None,
        agent_version: int = 0,
        request_id: str | None = None,
    ) -> run_pb2.Run:
        """Start a new run from step ``from_step_index`` of a finished one."""
        request = gw.ForkRunRequest(
            run_id=run_id,
            from_step_index=from_step_index,
            agent_version=agent_version,
            request_id=_request_id(request_id),
        )
        if input is not None:
            request.input = input
        response = await self._call(self.gateway.ForkRun, request)
        return response.run

    # approvals

    async def list_approvals(
        self,
        *,
        run_id: str = "",
        statuses: Iterable[approval_pb2.ApprovalStatus.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[approval_pb2.Approval]:
        """Approvals waiting for a person (or in ``statuses``), of one run or of all."""
        request = gw.ListApprovalsRequest(
            run_id=run_id, statuses=list(statuses), page_size=page_size, page_token=page_token
        )
        response = await self._call(self.gateway.ListApprovals, request)
        return Page(response.approvals, response.next_page_token)

    async def resolve_approval(
        self, approval_id: str, *, approve: bool, reason: str = ""
    ) -> approval_pb2.Approval:
        """Approve or deny a pending tool call; the run resumes."""
        decision = (
            approval_pb2.APPROVAL_DECISION_APPROVE
            if approve
            else approval_pb2.APPROVAL_DECISION_DENY
        )
        request = gw.ResolveApprovalRequest(
            approval_id=approval_id, decision=decision, reason=reason
        )
        response = await self._call(self.gateway.ResolveApproval, request)
        return response.approval

    # agents

    async def create_agent(
        self, agent: agent_pb2.Agent, *, request_id: str | None = None
    ) -> agent_pb2.Agent:
        """Create an agent (its version 1)."""
        request = gw.CreateAgentRequest(agent=agent, request_id=_request_id(request_id))
        response = await self._call(self.gateway.CreateAgent, request)
        return response.agent

    async def create_agent_version(
        self,
        agent: agent_pb2.Agent,
        *,
        fields: Iterable[str] = (),
        etag: str = "",
        request_id: str | None = None,
    ) -> agent_pb2.Agent:
        """A new version of ``agent.name`` taking ``fields`` (every set field when empty)."""
        request = gw.CreateAgentVersionRequest(
            agent=agent,
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
            etag=etag,
            request_id=_request_id(request_id),
        )
        response = await self._call(self.gateway.CreateAgentVersion, request)
        return response.agent

    async def get_agent(self, name: str, version: int = 0) -> agent_pb2.Agent:
        """An agent's latest version, or ``version``."""
        request = gw.GetAgentRequest(agent_name=name, agent_version=version)
        response = await self._call(self.gateway.GetAgent, request)
        return response.agent

    async def list_agents(
        self, *, page_size: int = 0, page_token: str = "", include_archived: bool = False
    ) -> Page[agent_pb2.Agent]:
        """One page of the tenant's agents."""
        request = gw.ListAgentsRequest(
            page_size=page_size, page_token=page_token, include_archived=include_archived
        )
        response = await self._call(self.gateway.ListAgents, request)
        return Page(response.agents, response.next_page_token)

    async def delete_agent(self, name: str) -> None:
        """Archive an agent: no new runs; its runs and versions stay readable."""
        await self._call(self.gateway.DeleteAgent, gw.DeleteAgentRequest(agent_name=name))

    # API keys (AdminService: an admin credential, e.g. the local stack's `admin` role)

    async def create_api_key(
        self,
        tenant_id: str,
        user_id: str,
        display_name: str,
        *,
        permissions: Iterable[str] = (),
        request_id: str | None = None,
    ) -> gw.CreateApiKeyResponse:
        """Create an API key; the response holds its secret, shown this once."""
        request = gw.CreateApiKeyRequest(
            tenant_id=tenant_id,
            user_id=user_id,
            display_name=display_name,
            permissions=list(permissions),
            request_id=_request_id(request_id),
        )
        return await self._call(self.admin.CreateApiKey, request)

    async def list_api_keys(
        self, *, tenant_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[api_key_pb2.ApiKey]:
        """One page of API keys (without secrets), of one tenant or of all."""
        request = gw.ListApiKeysRequest(
            tenant_id=tenant_id, page_size=page_size, page_token=page_token
        )
        response = await self._call(self.admin.ListApiKeys, request)
        return Page(response.api_keys, response.next_page_token)

    async def revoke_api_key(self, api_key_id: str, reason: str = "") -> api_key_pb2.ApiKey:
        """Revoke a key: it is refused from now on."""
        request = gw.RevokeApiKeyRequest(api_key_id=api_key_id, reason=reason)
        response = await self._call(self.admin.RevokeApiKey, request)
        return response.api_key
