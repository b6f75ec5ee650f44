"""The blocking Foredeck client: the same calls as :class:`~foredeck_client.aio.AsyncClient`.

::

    from foredeck_client import Client

    with Client() as client:
        run = client.create_run("What is 17 * 23? Use the calculator.")
        for event in client.watch_run(run.run_id):
            print(event)

It drives an :class:`AsyncClient` on an event loop of its own, in a daemon thread, so both
clients behave identically (retries, watch resumption, errors) and it can be used from any
thread, including from inside another event loop's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

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
from foredeck_client.aio import DEFAULT_TIMEOUT, AsyncClient, Page

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """A blocking connection to a Foredeck gateway; see :class:`AsyncClient` for the arguments."""

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
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="foredeck-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(
                address,
                api_key,
                data_dir=data_dir,
                role=role,
                timeout=timeout,
                retries=retries,
                watch_reconnects=watch_reconnects,
            )

        try:
            self._async = self._run(make())
        except BaseException:
            self._stop_loop()
            raise
        self.connection = self._async.connection

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(iterator)
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]  # `more` means an item came
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None and self._loop.is_running():
                self._run(aclose())

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def who_am_i(self) -> gw.WhoAmIResponse:
        """See :meth:`AsyncClient.who_am_i`."""
        return self._run(self._async.who_am_i())

    def create_run(
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
        """See :meth:`AsyncClient.create_run`."""
        return self._run(
            self._async.create_run(
                input,
                agent=agent,
                agent_version=agent_version,
                priority=priority,
                labels=labels,
                budget=budget,
                request_id=request_id,
            )
        )

    def get_run(self, run_id: str) -> run_pb2.Run:
        """See :meth:`AsyncClient.get_run`."""
        return self._run(self._async.get_run(run_id))

    def list_runs(
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
        """See :meth:`AsyncClient.list_runs`."""
        return self._run(
            self._async.list_runs(
                page_size=page_size,
                page_token=page_token,
                statuses=statuses,
                agent=agent,
                labels=labels,
                parent_run_id=parent_run_id,
                include_all_users=include_all_users,
            )
        )

    def watch_run(
        self,
        run_id: str,
        *,
        after_event_id: str = "",
        event_types: Iterable[run_event_pb2.RunEventType.ValueType] = (),
    ) -> Iterator[run_event_pb2.RunEvent]:
        """See :meth:`AsyncClient.watch_run`: resumes after a dropped stream by itself."""
        return self._iterate(
            self._async.watch_run(run_id, after_event_id=after_event_id, event_types=event_types)
        )

    def wait_run(self, run_id: str) -> run_pb2.Run:
        """See :meth:`AsyncClient.wait_run`."""
        return self._run(self._async.wait_run(run_id))

    def cancel_run(self, run_id: str, reason: str = "") -> run_pb2.Run:
        """See :meth:`AsyncClient.cancel_run`."""
        return self._run(self._async.cancel_run(run_id, reason))

    def get_run_tree(self, run_id: str) -> gw.GetRunTreeResponse:
        """See :meth:`AsyncClient.get_run_tree`."""
        return self._run(self._async.get_run_tree(run_id))

    def get_run_journal(
        self,
        run_id: str,
        *,
        view: journal_pb2.JournalView.ValueType = journal_pb2.JOURNAL_VIEW_BASIC,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[journal_pb2.JournalEntry]:
        """See :meth:`AsyncClient.get_run_journal`."""
        return self._run(
            self._async.get_run_journal(
                run_id, view=view, page_size=page_size, page_token=page_token
            )
        )

    def replay_run(self, run_id: str, *, strict: bool = False) -> gw.ReplayRunResponse:
        """See :meth:`AsyncClient.replay_run`."""
        return self._run(self._async.replay_run(run_id, strict=strict))

    def fork_run(
        self,
        run_id: str,
        from_step_index: int,
        *,
        input: str | None = None,
        agent_version: int = 0,
        request_id: str | None = None,
    ) -> run_pb2.Run:
        """See :meth:`AsyncClient.fork_run`."""
        return self._run(
            self._async.fork_run(
                run_id,
                from_step_index,
                input=input,
                agent_version=agent_version,
                request_id=request_id,
            )
        )

    def list_approvals(
        self,
        *,
        run_id: str = "",
        statuses: Iterable[approval_pb2.ApprovalStatus.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[approval_pb2.Approval]:
        """See :meth:`AsyncClient.list_approvals`."""
        return self._run(
            self._async.list_approvals(
                run_id=run_id, statuses=statuses, page_size=page_size, page_token=page_token
            )
        )

    def resolve_approval(
        self, approval_id: str, *, approve: bool, reason: str = ""
    ) -> approval_pb2.Approval:
        """See :meth:`AsyncClient.resolve_approval`."""
        return self._run(self._async.resolve_approval(approval_id, approve=approve, reason=reason))

    def create_agent(
        self, agent: agent_pb2.Agent, *, request_id: str | None = None
    ) -> agent_pb2.Agent:
        """See :meth:`AsyncClient.create_agent`."""
        return self._run(self._async.create_agent(agent, request_id=request_id))

    def create_agent_version(
        self,
        agent: agent_pb2.Agent,
        *,
        fields: Iterable[str] = (),
        etag: str = "",
        request_id: str | None = None,
    ) -> agent_pb2.Agent:
        """See :meth:`AsyncClient.create_agent_version`."""
        return self._run(
            self._async.create_agent_version(agent, fields=fields, etag=etag, request_id=request_id)
        )

    def get_agent(self, name: str, version: int = 0) -> agent_pb2.Agent:
        """See :meth:`AsyncClient.get_agent`."""
        return self._run(self._async.get_agent(name, version))

    def list_agents(
        self, *, page_size: int = 0, page_token: str = "", include_archived: bool = False
    ) -> Page[agent_pb2.Agent]:
        """See :meth:`AsyncClient.list_agents`."""
        return self._run(
            self._async.list_agents(
                page_size=page_size, page_token=page_token, include_archived=include_archived
            )
        )

    def delete_agent(self, name: str) -> None:
        """See :meth:`AsyncClient.delete_agent`."""
        self._run(self._async.delete_agent(name))

    def create_api_key(
        self,
        tenant_id: str,
        user_id: str,
        display_name: str,
        *,
        permissions: Iterable[str] = (),
        request_id: str | None = None,
    ) -> gw.CreateApiKeyResponse:
        """See :meth:`AsyncClient.create_api_key`."""
        return self._run(
            self._async.create_api_key(
                tenant_id,
                user_id,
                display_name,
                permissions=permissions,
                request_id=request_id,
            )
        )

    def list_api_keys(
        self, *, tenant_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[api_key_pb2.ApiKey]:
        """See :meth:`AsyncClient.list_api_keys`."""
        return self._run(
            self._async.list_api_keys(
                tenant_id=tenant_id, page_size=page_size, page_token=page_token
            )
        )

    def revoke_api_key(self, api_key_id: str, reason: str = "") -> api_key_pb2.ApiKey:
        """See :meth:`AsyncClient.revoke_api_key`."""
        return self._run(self._async.revoke_api_key(api_key_id, reason))
