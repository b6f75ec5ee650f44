"""Everything the gateway keeps in Redis: API keys, budgets, request windows, reservations.

Calls are bounded by the configured Redis timeout; a Redis that does not answer in time raises
:class:`StoreDown`, which the admission turns into fail-open or fail-closed per route.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from foredeck_gateway import lua

__all__ = [
    "Admission",
    "Budget",
    "DueReservation",
    "KeyRecord",
    "RedisState",
    "Refusal",
    "StoreDown",
    "period_bounds",
]

T = TypeVar("T")

REQUEST_ID_TTL_SECONDS = 86_400


class StoreDown(Exception):
    """Redis did not answer within the timeout, or refused the connection."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the admission script refused a call, as it reported it."""

    kind: str
    """``invalid``, ``revoked``, ``expired``, ``admin``, ``perm``, ``rate``, ``conc``,
    ``budget`` or ``reused``."""
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted caller as the script saw it, with its reservation for a run."""

    tenant_id: str
    user_id: str
    kind: str
    permissions: tuple[str, ...]
    api_key_id: str
    key_rpm: int
    user_rpm: int
    tenant_rpm: int
    max_concurrent_runs: int
    run_budget: tuple[int, int, int, int, int, int]
    """steps, tokens, cost, wall time ms, sub-agent depth, sub-agents."""
    budget_ids: tuple[str, ...]
    reserved_tokens: int = 0
    reserved_cost: int = 0
    reservation: str = ""
    """``new``, ``existing`` or empty when nothing was reserved."""
    reservation_id: str = ""


@dataclass(frozen=True, slots=True)
class DueReservation:
    """A reservation whose run is due a check."""

    reservation_id: str
    tenant_id: str
    user_id: str
    run_id: str
    created_ms: int
    permissions: tuple[str, ...]
    kind: str
    budget_ids: tuple[str, ...]
    now_ms: int


@dataclass(slots=True)
class KeyRecord:
    """An API key as stored, without its secret."""

    api_key_id: str
    prefix: str
    display_name: str
    tenant_id: str
    user_id: str
    kind: str
    permissions: list[str]
    key_rpm: int = 0
    user_rpm: int = 0
    tenant_rpm: int = 0
    max_concurrent_runs: int = 0
    run_budget: list[int] = field(default_factory=lambda: [0] * 6)
    state: str = "active"
    create_ms: int = 0
    created_by: str = ""
    expire_ms: int = 0
    revoke_ms: int = 0
    revoked_by: str = ""
    revoke_reason: str = ""
    last_use_ms: int = 0

    def to_hash(self) -> dict[str, str]:
        steps, tokens, cost, wall, depth, subs = self.run_budget
        return {
            "id": self.api_key_id,
            "prefix": self.prefix,
            "name": self.display_name,
            "tenant": self.tenant_id,
            "user": self.user_id,
            "kind": self.kind,
            "perms": " ".join(self.permissions),
            "klim": str(self.key_rpm),
            "ulim": str(self.user_rpm),
            "tlim": str(self.tenant_rpm),
            "conc": str(self.max_concurrent_runs),
            "rb_steps": str(steps),
            "rb_tokens": str(tokens),
            "rb_cost": str(cost),
            "rb_wall_ms": str(wall),
            "rb_depth": str(depth),
            "rb_subs": str(subs),
            "state": self.state,
            "create_ms": str(self.create_ms),
            "created_by": self.created_by,
            "expire_ms": str(self.expire_ms),
            "revoke_ms": str(self.revoke_ms),
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
        }

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> KeyRecord:
        h = {k.decode(): v.decode() for k, v in raw.items()}

        def num(name: str) -> int:
            return int(h.get(name) or 0)

        return cls(
            api_key_id=h["id"],
            prefix=h.get("prefix", ""),
            display_name=h.get("name", ""),
            tenant_id=h["tenant"],
            user_id=h["user"],
            kind=h.get("kind", "user"),
            permissions=h.get("perms", "").split(),
            key_rpm=num("klim"),
            user_rpm=num("ulim"),
            tenant_rpm=num("tlim"),
            max_concurrent_runs=num("conc"),
            run_budget=[
                num(n)
                for n in ("rb_steps", "rb_tokens", "rb_cost", "rb_wall_ms", "rb_depth", "rb_subs")
            ],
            state=h.get("state", "active"),
            create_ms=num("create_ms"),
            created_by=h.get("created_by", ""),
            expire_ms=num("expire_ms"),
            revoke_ms=num("revoke_ms"),
            revoked_by=h.get("revoked_by", ""),
            revoke_reason=h.get("revoke_reason", ""),
            last_use_ms=num("last_use_ms"),
        )


@dataclass(slots=True)
class Budget:
    """A spending budget as stored, with its current period applied."""

    tenant_id: str
    budget_id: str
    scope: str
    user_id: str
    api_key_id: str
    token_limit: int
    cost_limit: int
    period: str
    period_start_ms: int
    spent_tokens: int
    spent_cost: int
    reserved_tokens: int
    reserved_cost: int
    reservation_count: int
    update_ms: int
    updated_by: str
    etag: str
    reset_ms: int


def period_bounds(period: str, now: datetime | None = None) -> tuple[int, int]:
    """Start and end (ms since the epoch, UTC) of the current period; lifetime is ``(0, -1)``."""
    moment = now or datetime.now(UTC)
    if period == "daily":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end_s = calendar.timegm(start.timetuple()) + 86_400
        return int(start.timestamp() * 1000), end_s * 1000
    if period == "monthly":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        end = start.replace(year=year, month=month)
        return int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    return 0, -1


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Script:
    """A script run by EVALSHA, loaded again when Redis has forgotten it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self.sha is None:
            self.sha = await redis.script_load(self.source)
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


class RedisState:
    """The gateway's Redis: admission, settlement and the admin records."""

    def __init__(self, redis: Redis, *, prefix: str, timeout: float) -> None:
        self.redis = redis
        self.p = prefix
        self.timeout = timeout
        self._admit = _Script(lua.ADMIT)
        self._settle = _Script(lua.SETTLE)
        self._record = _Script(lua.RECORD_RUN)
        self._claim = _Script(lua.CLAIM_DUE)
        self._set_budget = _Script(lua.SET_BUDGET)
        self._create_key = _Script(lua.CREATE_KEY)
        self._period_cache: tuple[float, tuple[tuple[int, int], tuple[int, int]]] | None = None

    async def _bounded(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreDown(str(type(exc).__name__)) from exc

    def _periods(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The current day and month, worked out at most once a second."""
        now = time.time()
        if self._period_cache is None or now >= self._period_cache[0]:
            periods = (period_bounds("daily"), period_bounds("monthly"))
            self._period_cache = (int(now) + 1.0, periods)
        return self._period_cache[1]

    async def ping(self) -> bool:
        return bool(await self._bounded(self.redis.ping()))

    # -- admission ---------------------------------------------------------------------------

    async def admit(
        self,
        *,
        op: str,
        key_hash: str = "",
        permission: str = "",
        tenant_id: str = "",
        user_id: str = "",
        kind: str = "user",
        permissions: Sequence[str] = (),
        defaults: tuple[int, int, int, int],
        reservation_id: str = "",
        request_id: str = "",
        fingerprint: str = "",
        run_caps: tuple[int, int] = (0, 0),
        default_caps: tuple[int, int] = (0, 0),
        lease_ms: int = 0,
    ) -> Admission | Refusal:
        """Run the admission script once; see :data:`lua.ADMIT`."""
        day, month = self._periods()
        args = [
            self.p,
            op,
            key_hash,
            permission,
            tenant_id,
            user_id,
            *defaults,
            reservation_id,
            request_id,
            fingerprint,
            run_caps[0],
            run_caps[1],
            default_caps[0],
            default_caps[1],
            lease_ms,
            day[0],
            month[0],
            day[1],
            month[1],
            REQUEST_ID_TTL_SECONDS,
            kind,
            " ".join(permissions),
        ]
        packed = "\x1f".join(str(a) for a in args)
        raw = await self._bounded(self._admit(self.redis, (), (packed,)))
        values = _s(raw).split("\x1f")
        if values[0] != "ok":
            return Refusal(values[0], tuple(values[1:]))
        return Admission(
            tenant_id=values[1],
            user_id=values[2],
            kind=values[3],
            permissions=tuple(values[4].split()),
            api_key_id=values[5],
            key_rpm=int(values[6]),
            user_rpm=int(values[7]),
            tenant_rpm=int(values[8]),
            max_concurrent_runs=int(values[9]),
            run_budget=(
                int(values[10] or 0),
                int(values[11] or 0),
                int(values[12] or 0),
                int(values[13] or 0),
                int(values[14] or 0),
                int(values[15] or 0),
            ),
            budget_ids=tuple(values[16].split()),
            reserved_tokens=int(values[17]),
            reserved_cost=int(values[18]),
            reservation=values[19],
            reservation_id=values[20],
        )

    async def settle(self, reservation_id: str, tokens: int, cost: int) -> bool:
        """Charge a finished run's usage and end its reservation; False when already ended."""
        args = [self.p, reservation_id, "settle", tokens, cost]
        return bool(await self._bounded(self._settle(self.redis, (), args)))

    async def release(self, reservation_id: str) -> bool:
        """End a reservation without charging anything; False when already ended."""
        args = [self.p, reservation_id, "release", 0, 0]
        return bool(await self._bounded(self._settle(self.redis, (), args)))

    async def forget_request(self, tenant_id: str, request_id: str) -> None:
        """Drop a CreateRun request id whose submission was refused, so nothing refers to it."""
        await self._bounded(self.redis.delete(f"{self.p}:req:{tenant_id}:{request_id}"))

    async def record_run(self, reservation_id: str, run_id: str, lease_ms: int) -> bool:
        args = [self.p, reservation_id, run_id, lease_ms]
        return bool(await self._bounded(self._record(self.redis, (), args)))

    async def claim_due(self, limit: int, lease_ms: int) -> list[DueReservation]:
        raw = await self._bounded(self._claim(self.redis, (), [self.p, limit, lease_ms]))
        due: list[DueReservation] = []
        for item in raw:
            v = [_s(x) for x in item]
            due.append(
                DueReservation(
                    reservation_id=v[0],
                    tenant_id=v[1],
                    user_id=v[2],
                    run_id=v[3],
                    created_ms=int(v[4] or 0),
                    permissions=tuple(v[5].split()),
                    kind=v[6] or "user",
                    budget_ids=tuple(v[7].split()),
                    now_ms=int(v[8]),
                )
            )
        return due

    async def active_runs(self, tenant_id: str, user_id: str) -> int:
        return int(await self._bounded(self.redis.scard(f"{self.p}:act:{tenant_id}:{user_id}")))

    # -- API keys ----------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord, key_hash: str) -> bool:
        """Write a key, its hash index and its listing entries at once, unless a key with its
        id exists already (then nothing is written and False returned)."""
        fields = [item for pair in record.to_hash().items() for item in pair]
        args = [self.p, record.api_key_id, key_hash, record.tenant_id, record.create_ms, *fields]
        return bool(await self._bounded(self._create_key(self.redis, (), args)))

    async def get_key(self, api_key_id: str) -> KeyRecord | None:
        raw: dict[Any, Any] = await self._bounded(self.redis.hgetall(f"{self.p}:key:{api_key_id}"))
        return KeyRecord.from_hash(raw) if raw else None

    async def key_for_hash(self, key_hash: str) -> KeyRecord | None:
        key_id = await self._bounded(self.redis.get(f"{self.p}:kh:{key_hash}"))
        return await self.get_key(_s(key_id)) if key_id else None

    async def revoke_key(self, api_key_id: str, by: str, reason: str, now_ms: int) -> None:
        """Mark a key revoked; its calls fail from the next admission on, on every replica."""
        fields: dict[Any, Any] = {
            "state": "revoked",
            "revoke_ms": str(now_ms),
            "revoked_by": by,
            "revoke_reason": reason,
        }
        await self._bounded(self.redis.hset(f"{self.p}:key:{api_key_id}", mapping=fields))

    async def list_key_ids(self, tenant_id: str, start: int, count: int) -> list[str]:
        index = f"{self.p}:keys:t:{tenant_id}" if tenant_id else f"{self.p}:keys"
        ids = await self._bounded(self.redis.zrevrange(index, start, start + count - 1))
        return [_s(i) for i in ids]

    # -- admin idempotency -------------------------------------------------------------------

    async def remembered(self, scope: str, request_id: str) -> tuple[str, str] | None:
        raw = await self._bounded(self.redis.get(f"{self.p}:areq:{scope}:{request_id}"))
        if not raw:
            return None
        fingerprint, _, payload = _s(raw).partition(" ")
        return fingerprint, payload

    async def remember(self, scope: str, request_id: str, fingerprint: str, payload: str) -> bool:
        """Record an admin request id; False when another call recorded it first."""
        done = await self._bounded(
            self.redis.set(
                f"{self.p}:areq:{scope}:{request_id}",
                f"{fingerprint} {payload}",
                nx=True,
                ex=REQUEST_ID_TTL_SECONDS,
            )
        )
        return bool(done)

    async def overwrite_remembered(
        self, scope: str, request_id: str, fingerprint: str, payload: str
    ) -> None:
        await self._bounded(
            self.redis.set(
                f"{self.p}:areq:{scope}:{request_id}",
                f"{fingerprint} {payload}",
                ex=REQUEST_ID_TTL_SECONDS,
            )
        )

    # -- budgets -----------------------------------------------------------------------------

    def budget_key(self, tenant_id: str, budget_id: str) -> str:
        return f"{self.p}:b:{tenant_id}:{budget_id}"

    async def set_budget(
        self,
        *,
        tenant_id: str,
        budget_id: str,
        scope: str,
        user_id: str,
        api_key_id: str,
        fields: str,
        token_limit: int,
        cost_limit: int,
        period: str,
        etag: str,
        by: str,
        now_ms: int,
    ) -> bool:
        """Write the named fields (``t``, ``c``, ``p``); False on an etag mismatch."""
        args = [
            etag,
            secrets.token_hex(8),
            now_ms,
            f"{self.p}:budgets",
            fields,
            token_limit,
            cost_limit,
            period,
            f"{tenant_id}\n{budget_id}",
            period_bounds(period)[0],
            by,
            scope,
            tenant_id,
            user_id,
            api_key_id,
        ]
        raw = await self._bounded(
            self._set_budget(self.redis, (self.budget_key(tenant_id, budget_id),), args)
        )
        return _s(raw[0]) == "ok"

    async def get_budget(self, tenant_id: str, budget_id: str) -> Budget | None:
        raw = await self._bounded(self.redis.hgetall(self.budget_key(tenant_id, budget_id)))
        if not raw:
            return None
        h = {_s(k): _s(v) for k, v in raw.items()}

        def num(name: str) -> int:
            return int(h.get(name) or 0)

        period = h.get("period", "lifetime")
        current = period_bounds(period)[0]
        rolled = num("pstart") != current
        return Budget(
            tenant_id=tenant_id,
            budget_id=budget_id,
            scope=h.get("scope", ""),
            user_id=h.get("user", ""),
            api_key_id=h.get("key", ""),
            token_limit=num("tlim"),
            cost_limit=num("clim"),
            period=period,
            period_start_ms=current,
            spent_tokens=0 if rolled else num("spent_t"),
            spent_cost=0 if rolled else num("spent_c"),
            reserved_tokens=num("res_t"),
            reserved_cost=num("res_c"),
            reservation_count=num("rcount"),
            update_ms=num("update_ms"),
            updated_by=h.get("updated_by", ""),
            etag=h.get("etag", ""),
            reset_ms=num("reset_ms"),
        )

    async def reset_budget(
        self, tenant_id: str, budget_id: str, etag: str, now_ms: int
    ) -> tuple[int, int] | None:
        """Zero the spent amounts; None on an etag mismatch. Returns what was reset."""
        key = self.budget_key(tenant_id, budget_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await self._bounded(pipe.watch(key))
                raw = await self._bounded(pipe.hmget(key, ["etag", "spent_t", "spent_c"]))
                if etag and _s(raw[0] or b"") != etag:
                    return None
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(
                    key,
                    mapping={
                        "spent_t": 0,
                        "spent_c": 0,
                        "reset_ms": now_ms,
                        "etag": secrets.token_hex(8),
                    },
                )
                await self._bounded(pipe.execute())
            except RedisError as exc:
                raise StoreDown(type(exc).__name__) from exc
        return int(raw[1] or 0), int(raw[2] or 0)

    async def list_budget_refs(
        self, tenant_id: str, after: str, count: int
    ) -> list[tuple[str, str]]:
        index = f"{self.p}:budgets"
        low = f"({after}" if after else (f"[{tenant_id}\n" if tenant_id else "-")
        high = f"[{tenant_id}\n\xff" if tenant_id else "+"
        raw = await self._bounded(self.redis.zrangebylex(index, low, high, start=0, num=count))
        refs: list[tuple[str, str]] = []
        for item in raw:
            tenant, _, budget_id = _s(item).partition("\n")
            refs.append((tenant, budget_id))
        return refs


def dumps(value: Any) -> str:
    """Compact JSON for records kept in Redis."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
