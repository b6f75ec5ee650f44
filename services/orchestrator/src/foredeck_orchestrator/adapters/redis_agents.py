"""Agent definitions in Redis: one hash per agent holding every immutable version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from foredeck.common.v1 import agent_pb2
from foredeck_orchestrator.adapters import scripts
from foredeck_orchestrator.adapters.keys import Keys

__all__ = ["AgentWrite", "RedisAgents"]


@dataclass(frozen=True, slots=True)
class AgentWrite:
    """What a create found: ``created``, ``again`` (same request id, same content),
    ``reused`` (same request id, other content), ``exists``, ``missing``, ``archived`` or
    ``moved`` (the latest version changed since it was read)."""

    state: str
    agent: agent_pb2.Agent | None = None
    latest: int = 0


def _int(value: bytes | str | None) -> int:
    if value is None:
        return 0
    return int(value.decode() if isinstance(value, bytes) else value)


class RedisAgents:
    """Create, version, read, list and archive agents of a tenant."""

    def __init__(self, redis: Redis, keys: Keys, *, idempotency_ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = idempotency_ttl_seconds
        self._create = redis.register_script(scripts.CREATE_AGENT)
        self._version = redis.register_script(scripts.CREATE_AGENT_VERSION)
        self._delete = redis.register_script(scripts.DELETE_AGENT)

    @staticmethod
    def _decorate(agent: agent_pb2.Agent, state: int, archived_ms: int) -> agent_pb2.Agent:
        agent.state = agent_pb2.AGENT_STATE_ARCHIVED if state == 2 else agent_pb2.AGENT_STATE_ACTIVE
        if state == 2 and archived_ms:
            agent.archive_time.FromMilliseconds(archived_ms)
        return agent

    async def create(
        self, tenant_id: str, agent: agent_pb2.Agent, request_id: str, digest: str
    ) -> AgentWrite:
        """Write version 1 unless the name is taken."""
        result = await self._create(
            keys=[
                self.keys.agent(tenant_id, agent.name),
                self.keys.agent_requests(tenant_id, agent.name),
            ],
            args=[request_id, digest, agent.SerializeToString(), self.ttl],
        )
        state = result[0].decode()
        if state in ("created", "again"):
            await self.redis.zadd(self.keys.agent_index(tenant_id), {agent.name: 0})
            stored = agent_pb2.Agent.FromString(result[1])
            return AgentWrite(state, self._decorate(stored, 1, 0))
        return AgentWrite(state)

    async def create_version(
        self,
        tenant_id: str,
        name: str,
        agent: agent_pb2.Agent,
        request_id: str,
        digest: str,
        expected_latest: int,
    ) -> AgentWrite:
        """Write ``agent`` as version ``expected_latest + 1`` if the latest has not moved."""
        result = await self._version(
            keys=[self.keys.agent(tenant_id, name), self.keys.agent_requests(tenant_id, name)],
            args=[request_id, digest, expected_latest, agent.SerializeToString(), self.ttl],
        )
        state = result[0].decode()
        if state in ("created", "again"):
            stored = agent_pb2.Agent.FromString(result[1])
            return AgentWrite(state, self._decorate(stored, 1, 0))
        if state == "moved":
            return AgentWrite(state, latest=_int(result[1]))
        return AgentWrite(state)

    async def get(self, tenant_id: str, name: str, version: int = 0) -> agent_pb2.Agent | None:
        """One version (the latest when ``version`` is 0), or None."""
        key = self.keys.agent(tenant_id, name)
        latest, state, archived = await self.redis.hmget(key, "latest", "state", "archived")
        if latest is None:
            return None
        wanted = version or _int(latest)
        raw: Any = await self.redis.hget(key, f"v{wanted}")
        if raw is None:
            return None
        return self._decorate(agent_pb2.Agent.FromString(raw), _int(state), _int(archived))

    async def latest_number(self, tenant_id: str, name: str) -> tuple[int, int]:
        """(latest version, state) of an agent; (0, 0) when it does not exist."""
        latest, state = await self.redis.hmget(self.keys.agent(tenant_id, name), "latest", "state")
        return _int(latest), _int(state)

    async def versions(
        self, tenant_id: str, name: str, numbers: Sequence[int]
    ) -> list[agent_pb2.Agent]:
        """The given versions of one agent, in the order asked."""
        key = self.keys.agent(tenant_id, name)
        state, archived = await self.redis.hmget(key, "state", "archived")
        raws: Any = await self.redis.hmget(key, [f"v{n}" for n in numbers])
        return [
            self._decorate(agent_pb2.Agent.FromString(raw), _int(state), _int(archived))
            for raw in raws
            if raw is not None
        ]

    async def names(self, tenant_id: str, after: str, count: int) -> list[str]:
        """Agent names of a tenant in lexical order, strictly after ``after``."""
        start = "(" + after if after else "-"
        names = await self.redis.zrangebylex(
            self.keys.agent_index(tenant_id), start, "+", start=0, num=count
        )
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    async def archive(self, tenant_id: str, name: str) -> bool:
        """Archive the agent; False when it does not exist."""
        return int(await self._delete(keys=[self.keys.agent(tenant_id, name)])) == 1
