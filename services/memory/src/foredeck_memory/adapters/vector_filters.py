"""The one place that turns a scope and a :class:`VectorFilter` into store conditions.

Both vector adapters build their filters from :func:`conditions`, whose first two conditions
are always the scope's tenant and user: callers pass a filter, never the partition keys, so no
call can search outside its partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from foredeck_memory.domain.models import Scope, VectorFilter

PARTITION_FIELDS = ("tenant_id", "user_id")
"""Payload fields that partition the vectors; a caller's filter may not name them."""

KEYWORD_INDEXES = (
    "tenant_id",
    "user_id",
    "chain_id",
    "dedup_key",
    "fact_key",
    "category",
    "entity_refs",
    "run_id",
    "memory_id",
)
INTEGER_INDEXES = ("valid_from", "valid_to")


@dataclass(frozen=True)
class Condition:
    """One store-neutral condition: exact value, any of values, or an integer range."""

    key: str
    value: str | int | bool | float | None = None
    any_of: tuple[str, ...] = ()
    gte: int | None = None
    lt: int | None = None
    kind: str = "eq"


def conditions(scope: Scope | None, where: VectorFilter, *, tenant_id: str = "") -> list[Condition]:
    """The conditions for a query in ``scope``: partition first, then the caller's filter.

    ``scope=None`` with ``tenant_id`` selects the whole tenant (counts for the gauge only).
    """
    out: list[Condition] = []
    if scope is not None:
        out.append(Condition("tenant_id", scope.tenant_id))
        out.append(Condition("user_id", scope.user_id))
    else:
        if not tenant_id:
            raise ValueError("a vector query needs a tenant")
        out.append(Condition("tenant_id", tenant_id))
    for key, value in where.equals.items():
        _check_key(key)
        out.append(Condition(key, value))
    for key, values in where.any_of.items():
        _check_key(key)
        out.append(Condition(key, any_of=tuple(values), kind="any"))
    for key, gte, lt in where.ranges:
        _check_key(key)
        out.append(Condition(key, gte=gte, lt=lt, kind="range"))
    if where.ids:
        out.append(Condition("memory_id", any_of=tuple(where.ids), kind="any"))
    return out


def _check_key(key: str) -> None:
    if key in PARTITION_FIELDS:
        raise ValueError(f"a filter may not name the partition field {key!r}")
