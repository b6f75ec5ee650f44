"""gRPC servicers of foredeck.memory.v1: proto ⇄ domain, nothing else.

The tenant and user always come from the verified principal; typed domain faults and store
outages become rich statuses here (one ErrorInfo first, then BadRequest / RetryInfo /
QuotaFailure).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from foredeck.common.v1 import memory_pb2 as common_memory_pb2
from foredeck.common.v1 import provenance_pb2
from foredeck.memory.v1 import (
    entity_pb2,
    memory_pb2,
    memory_service_pb2,
    memory_service_pb2_grpc,
    session_pb2,
)
from foredeck_kit.errors import ServiceError
from foredeck_kit.principal import Principal, current_principal
from foredeck_memory.adapters.redis_support import IdempotencyRecords
from foredeck_memory.domain import errors
from foredeck_memory.domain import validation as v
from foredeck_memory.domain.errors import Fault, StoreDown
from foredeck_memory.domain.long_term import LongTermMemory, RememberInput
from foredeck_memory.domain.models import (
    OPEN_END,
    EntityVersion,
    MemoryRecord,
    RelationshipVersion,
    Scope,
    VectorFilter,
    entity_key,
    now_us,
    split_entity_key,
)
from foredeck_memory.domain.ports import GraphStore
from foredeck_memory.domain.working import WorkingMemory
from foredeck_memory.observability import MemoryMetrics

READ, WRITE, FORGET, ADMIN = "memory:read", "memory:write", "memory:forget", "memory:admin"

_CODES = {kind: getattr(grpc.StatusCode, kind.value) for kind in errors.FaultKind}

StoreDownHook = Callable[[str], None]


@contextlib.contextmanager
def mapped_faults(on_store_down: StoreDownHook, retry_after: timedelta) -> Iterator[None]:
    """Turn domain faults and store outages into the kit's ServiceError."""
    try:
        yield
    except Fault as fault:
        raise ServiceError(
            _CODES[fault.kind],
            fault.reason,
            fault.message,
            metadata=fault.metadata,
            field_violations=fault.field_violations,
            retry_after=fault.retry_after,
            quota_violations=fault.quota_violations,
        ) from fault
    except StoreDown as down:
        on_store_down(down.store)
        outage = errors.store_unavailable(down.store, retry_after)
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            outage.reason,
            outage.message,
            metadata=outage.metadata,
            retry_after=retry_after,
        ) from down


def _scope(permission: str) -> tuple[Principal, Scope]:
    principal = current_principal()
    principal.require(permission)
    return principal, Scope(principal.tenant_id, principal.user_id)


def _run_of(principal: Principal, run_id: str) -> str:
    """The run to record as provenance: a delegated principal acts only for its own run."""
    principal.require_run(run_id)
    return run_id or principal.run_id or ""


def _us(ts: timestamp_pb2.Timestamp, present: bool) -> int | None:
    return ts.ToMicroseconds() if present else None


def _set_ts(target: timestamp_pb2.Timestamp, micros: int) -> None:
    target.FromMicroseconds(micros)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _provenance(tenant: str, user: str, run: str, step: str, at: int) -> provenance_pb2.Provenance:
    p = provenance_pb2.Provenance(tenant_id=tenant, user_id=user, run_id=run, step_id=step)
    p.create_time.FromMicroseconds(at)
    return p


_STATES = {
    "CURRENT": common_memory_pb2.MEMORY_STATE_CURRENT,
    "SUPERSEDED": common_memory_pb2.MEMORY_STATE_SUPERSEDED,
    "RETIRED": common_memory_pb2.MEMORY_STATE_RETIRED,
    "EXPIRED": common_memory_pb2.MEMORY_STATE_EXPIRED,
    "PENDING": common_memory_pb2.MEMORY_STATE_PENDING,
}
_REMEMBER_OUTCOMES = {
    "CREATED": memory_pb2.REMEMBER_OUTCOME_CREATED,
    "MERGED_EXACT_DUPLICATE": memory_pb2.REMEMBER_OUTCOME_MERGED_EXACT_DUPLICATE,
    "MERGED_NEAR_DUPLICATE": memory_pb2.REMEMBER_OUTCOME_MERGED_NEAR_DUPLICATE,
    "SUPERSEDED": memory_pb2.REMEMBER_OUTCOME_SUPERSEDED,
}
_UPSERT_OUTCOMES = {
    "CREATED": entity_pb2.UPSERT_OUTCOME_CREATED,
    "SUPERSEDED": entity_pb2.UPSERT_OUTCOME_SUPERSEDED,
    "UNCHANGED": entity_pb2.UPSERT_OUTCOME_UNCHANGED,
}
_DEDUP = {
    memory_pb2.DEDUP_POLICY_UNSPECIFIED: "merge",
    memory_pb2.DEDUP_POLICY_MERGE: "merge",
    memory_pb2.DEDUP_POLICY_EXACT_ONLY: "exact",
    memory_pb2.DEDUP_POLICY_NONE: "none",
}
_DIRECTIONS = {
    entity_pb2.RELATIONSHIP_DIRECTION_UNSPECIFIED: "BOTH",
    entity_pb2.RELATIONSHIP_DIRECTION_BOTH: "BOTH",
    entity_pb2.RELATIONSHIP_DIRECTION_OUTGOING: "OUTGOING",
    entity_pb2.RELATIONSHIP_DIRECTION_INCOMING: "INCOMING",
}
_MODES = {
    entity_pb2.PROPERTIES_MODE_UNSPECIFIED: "MERGE",
    entity_pb2.PROPERTIES_MODE_MERGE: "MERGE",
    entity_pb2.PROPERTIES_MODE_REPLACE: "REPLACE",
}


def memory_to_proto(record: MemoryRecord, at: int | None = None) -> common_memory_pb2.Memory:
    """The wire form of a memory version, with its state at ``at`` (default now)."""
    out = common_memory_pb2.Memory(
        memory_id=record.memory_id,
        content=record.content,
        metadata=_struct(record.metadata),
        category=record.category,
        provenance=_provenance(
            record.provenance.tenant_id,
            record.provenance.user_id,
            record.provenance.run_id,
            record.provenance.step_id,
            record.create_time,
        ),
        supersedes_memory_id=record.supersedes,
        superseded_by_memory_id=record.superseded_by,
        dedup_key=record.dedup_key,
        fact_key=record.fact_key,
        entity_refs=[
            common_memory_pb2.EntityRef(type=t, entity_id=i)
            for t, i in (split_entity_key(k) for k in record.entity_refs)
        ],
        merge_count=record.merge_count,
        state=_STATES[record.state(at if at is not None else now_us())],
        embedding_model=record.embedding_model,
        etag=record.etag,
    )
    _set_ts(out.valid_from, record.valid_from)
    if record.valid_to < OPEN_END:
        _set_ts(out.valid_to, record.valid_to)
    _set_ts(out.create_time, record.create_time)
    _set_ts(out.update_time, record.update_time)
    return out


def entity_to_proto(entity: EntityVersion) -> entity_pb2.Entity:
    """The wire form of an entity version."""
    out = entity_pb2.Entity(
        type=entity.entity_type,
        entity_id=entity.entity_id,
        name=entity.name,
        properties=_struct(entity.properties),
        provenance=_provenance(
            entity.provenance.tenant_id,
            entity.provenance.user_id,
            entity.provenance.run_id,
            entity.provenance.step_id,
            entity.update_time,
        ),
        version=entity.version,
    )
    _set_ts(out.valid_from, entity.valid_from)
    if entity.valid_to < OPEN_END:
        _set_ts(out.valid_to, entity.valid_to)
    _set_ts(out.create_time, entity.create_time)
    _set_ts(out.update_time, entity.update_time)
    return out


def relationship_to_proto(rel: RelationshipVersion) -> entity_pb2.Relationship:
    """The wire form of a relationship version."""
    out = entity_pb2.Relationship(
        relationship_id=rel.relationship_id,
        source=common_memory_pb2.EntityRef(type=rel.source[0], entity_id=rel.source[1]),
        type=rel.rel_type,
        target=common_memory_pb2.EntityRef(type=rel.target[0], entity_id=rel.target[1]),
        properties=_struct(rel.properties),
        provenance=_provenance(
            rel.provenance.tenant_id,
            rel.provenance.user_id,
            rel.provenance.run_id,
            rel.provenance.step_id,
            rel.update_time,
        ),
        version=rel.version,
        superseded_by_relationship_id=rel.superseded_by,
    )
    _set_ts(out.valid_from, rel.valid_from)
    if rel.valid_to < OPEN_END:
        _set_ts(out.valid_to, rel.valid_to)
    _set_ts(out.create_time, rel.create_time)
    _set_ts(out.update_time, rel.update_time)
    return out


def _page_token(
    kind: str, fingerprint: str, offset: int, extra: dict[str, Any] | None = None
) -> str:
    body = {"k": kind, "f": fingerprint, "o": offset, **(extra or {})}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


def _read_page_token(token: str, kind: str, fingerprint: str) -> dict[str, Any]:
    if not token:
        return {"o": 0}
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError) as exc:
        raise errors.page_token_invalid() from exc
    if not isinstance(body, dict) or body.get("k") != kind or body.get("f") != fingerprint:
        raise errors.page_token_invalid()
    if not isinstance(body.get("o"), int) or body["o"] < 0:
        raise errors.page_token_invalid()
    return body


def _page_size(value: int, default: int, maximum: int) -> int:
    # AIP-158: a size over the maximum is read as the maximum; only a negative one is wrong.
    if value < 0:
        raise errors.invalid([("page_size", "must not be negative")])
    return min(value or default, maximum)


class _Base:
    def __init__(
        self,
        *,
        on_store_down: StoreDownHook,
        retry_after: timedelta,
        idempotency: IdempotencyRecords | None,
    ) -> None:
        self._on_store_down = on_store_down
        self._retry_after = retry_after
        self._idempotency = idempotency

    def _faults(self) -> contextlib.AbstractContextManager[None]:
        return mapped_faults(self._on_store_down, self._retry_after)

    async def _once(
        self,
        rpc: str,
        scope: Scope,
        request_id: str,
        request: Message,
        response_type: type[Any],
        work: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run a write once per client request id, replaying the recorded response."""
        if self._idempotency is None or not request_id:
            return await work()

        async def run() -> bytes:
            response = await work()
            data: bytes = response.SerializeToString(deterministic=True)
            return data

        data, replayed = await self._idempotency.run(
            rpc,
            scope.tenant_id,
            scope.user_id,
            request_id,
            request.SerializeToString(deterministic=True),
            run,
        )
        response = response_type.FromString(data)
        if replayed:
            response.replayed = True
        return response


class WorkingMemoryServicer(memory_service_pb2_grpc.WorkingMemoryServiceServicer, _Base):
    """foredeck.memory.v1.WorkingMemoryService."""

    def __init__(self, working: WorkingMemory, **kwargs: Any) -> None:
        _Base.__init__(self, **kwargs)
        self._working = working

    def _session(self, meta: Any, scope: Scope) -> session_pb2.Session:
        out = session_pb2.Session(
            session_id=meta.session_id,
            tenant_id=scope.tenant_id,
            user_id=scope.user_id,
            message_count=meta.message_count,
            last_sequence=meta.last_sequence,
            summary_count=meta.summary_count,
        )
        _set_ts(out.create_time, meta.create_time)
        _set_ts(out.update_time, meta.update_time)
        _set_ts(out.expire_time, meta.expire_time)
        return out

    async def AppendMessages(
        self, request: memory_service_pb2.AppendMessagesRequest, context: Any
    ) -> memory_service_pb2.AppendMessagesResponse:
        with self._faults():
            principal, scope = _scope(WRITE)
            run_id = _run_of(principal, request.run_id)
            violations = v.id_violations("session_id", request.session_id, required=True)
            violations += v.id_violations("request_id", request.request_id, required=True)
            violations += v.short_text_violations("run_id", request.run_id)
            violations += v.short_text_violations("step_id", request.step_id)
            if not 1 <= len(request.messages) <= 100:
                violations.append(("messages", "1 to 100 messages"))
            for index, message in enumerate(request.messages):
                if message.role == 0:
                    violations.append((f"messages[{index}].role", "required"))
                if not message.parts:
                    violations.append((f"messages[{index}].parts", "at least one part"))
                size = message.ByteSize()
                if size > 1024 * 1024:
                    raise errors.request_too_large(f"messages[{index}]", 1024 * 1024, size)
            ttl: int | None = None
            if request.HasField("session_ttl"):
                ttl = request.session_ttl.seconds
                if not 60 <= ttl <= 30 * 24 * 3600:
                    violations.append(("session_ttl", "between 1 minute and 30 days"))
            if request.HasField("expected_last_sequence") and request.expected_last_sequence < 0:
                violations.append(("expected_last_sequence", "must not be negative"))
            v.raise_if(violations)

            async def work() -> memory_service_pb2.AppendMessagesResponse:
                sequences, meta = await self._working.append(
                    scope,
                    request.session_id,
                    list(request.messages),
                    run_id=run_id,
                    step_id=request.step_id,
                    expected_last_sequence=(
                        request.expected_last_sequence
                        if request.HasField("expected_last_sequence")
                        else None
                    ),
                    ttl_seconds=ttl,
                )
                return memory_service_pb2.AppendMessagesResponse(
                    sequences=sequences, session=self._session(meta, scope)
                )

            response: memory_service_pb2.AppendMessagesResponse = await self._once(
                "AppendMessages",
                scope,
                request.request_id,
                request,
                memory_service_pb2.AppendMessagesResponse,
                work,
            )
            return response

    async def GetContextWindow(
        self, request: memory_service_pb2.GetContextWindowRequest, context: Any
    ) -> memory_service_pb2.GetContextWindowResponse:
        with self._faults():
            _, scope = _scope(READ)
            violations = v.id_violations("session_id", request.session_id, required=True)
            if not 1 <= request.token_budget <= 2_000_000:
                violations.append(("token_budget", "between 1 and 2,000,000"))
            if not 1 <= len(request.model) <= 128:
                violations.append(("model", "1 to 128 characters"))
            if len(request.summarization_model) > 128:
                violations.append(("summarization_model", "at most 128 characters"))
            if request.max_summary_tokens < 0 or (
                request.max_summary_tokens
                and request.max_summary_tokens > request.token_budget // 2
            ):
                violations.append(("max_summary_tokens", "0, or 1 to half of token_budget"))
            v.raise_if(violations)
            window = await self._working.context_window(
                scope,
                request.session_id,
                token_budget=request.token_budget,
                summarize=request.overflow_policy != session_pb2.OVERFLOW_POLICY_TRUNCATE,
                summary_model=request.summarization_model,
                max_summary_tokens=request.max_summary_tokens,
            )
            out = memory_service_pb2.GetContextWindowResponse(
                messages=window.messages,
                system_tokens=window.system_tokens,
                summary_tokens=window.summary_tokens,
                message_tokens=window.message_tokens,
                total_tokens=window.system_tokens + window.summary_tokens + window.message_tokens,
                tokenizer=window.tokenizer,
                summarized=window.summarized,
                omitted_message_count=window.omitted,
                last_sequence=window.last_sequence,
            )
            if window.system_message is not None:
                out.system_message.CopyFrom(window.system_message)
            if window.summary is not None:
                out.summary.CopyFrom(window.summary)
            if window.usage is not None:
                out.summarization_usage.CopyFrom(window.usage)
            return out

    async def ListMessages(
        self, request: memory_service_pb2.ListMessagesRequest, context: Any
    ) -> memory_service_pb2.ListMessagesResponse:
        with self._faults():
            _, scope = _scope(READ)
            violations = v.id_violations("session_id", request.session_id, required=True)
            if request.after_sequence < 0:
                violations.append(("after_sequence", "must not be negative"))
            v.raise_if(violations)
            size = _page_size(request.page_size, 100, 1000)
            fingerprint = f"{request.session_id}:{request.after_sequence}"
            token = _read_page_token(request.page_token, "msgs", fingerprint)
            after = max(request.after_sequence, int(token["o"]))
            page, summaries, meta, more = await self._working.list_messages(
                scope, request.session_id, after, size
            )
            next_token = _page_token("msgs", fingerprint, page[-1].sequence) if more else ""
            return memory_service_pb2.ListMessagesResponse(
                messages=page,
                summaries=summaries,
                next_page_token=next_token,
                session=self._session(meta, scope),
            )

    async def ClearSession(
        self, request: memory_service_pb2.ClearSessionRequest, context: Any
    ) -> memory_service_pb2.ClearSessionResponse:
        with self._faults():
            _, scope = _scope(WRITE)
            v.raise_if(v.id_violations("session_id", request.session_id, required=True))
            messages, summaries = await self._working.store.clear(scope, request.session_id)
            return memory_service_pb2.ClearSessionResponse(
                deleted_message_count=messages, deleted_summary_count=summaries
            )


def _entity_ref_checks(
    types: v.TypeCatalogue, refs: list[tuple[str, common_memory_pb2.EntityRef]]
) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    for path, ref in refs:
        if not v.ENTITY_TYPE_RE.match(ref.type):
            violations.append((f"{path}.type", "malformed entity type"))
        violations += types.check_entity_id(f"{path}.entity_id", ref.entity_id)
    v.raise_if(violations)
    types.check_entity_types([(f"{path}.type", ref.type) for path, ref in refs])
    return violations


def _memory_filter(
    types: v.TypeCatalogue, flt: memory_pb2.MemoryFilter, field: str
) -> tuple[VectorFilter, int | None, bool]:
    violations: list[tuple[str, str]] = []
    equals: dict[str, str | int | bool | float] = {}
    if len(flt.metadata_equals) > v.MAX_FILTER_ITEMS:
        violations.append((f"{field}.metadata_equals", "at most 16 keys"))
    for key, value in json_format.MessageToDict(flt.metadata_equals).items():
        if not v.METADATA_KEY_RE.match(key):
            violations.append((f"{field}.metadata_equals.{key}", "malformed key"))
        elif isinstance(value, bool | str):
            equals[f"metadata.{key}"] = value
        elif isinstance(value, int | float):
            equals[f"metadata.{key}"] = int(value) if float(value).is_integer() else float(value)
        else:
            violations.append((f"{field}.metadata_equals.{key}", "string, number or boolean"))
    any_of: dict[str, list[str]] = {}
    for name, values in (("categories", flt.categories), ("run_ids", flt.run_ids)):
        if len(values) > v.MAX_FILTER_ITEMS:
            violations.append((f"{field}.{name}", "at most 16 values"))
    if flt.categories:
        any_of["category"] = list(flt.categories)
    if flt.run_ids:
        any_of["run_id"] = list(flt.run_ids)
    if len(flt.entity_refs) > v.MAX_FILTER_ITEMS:
        violations.append((f"{field}.entity_refs", "at most 16 entities"))
    if flt.include_superseded and flt.HasField("as_of"):
        violations.append((f"{field}.as_of", "must be unset with include_superseded"))
    v.raise_if(violations)
    if flt.entity_refs:
        _entity_ref_checks(
            types, [(f"{field}.entity_refs[{i}]", r) for i, r in enumerate(flt.entity_refs)]
        )
        any_of["entity_refs"] = [entity_key(r.type, r.entity_id) for r in flt.entity_refs]
    as_of = flt.as_of.ToMicroseconds() if flt.HasField("as_of") else None
    return VectorFilter(equals=equals, any_of=any_of), as_of, flt.include_superseded


class LongTermMemoryServicer(memory_service_pb2_grpc.LongTermMemoryServiceServicer, _Base):
    """foredeck.memory.v1.LongTermMemoryService."""

    def __init__(
        self,
        long_term: LongTermMemory,
        working: WorkingMemory,
        types: v.TypeCatalogue,
        metrics: MemoryMetrics | None,
        **kwargs: Any,
    ) -> None:
        _Base.__init__(self, **kwargs)
        self._memory = long_term
        self._working = working
        self._types = types
        self._metrics = metrics

    async def _count(self, tenant_id: str) -> None:
        if self._metrics is None:
            return
        with contextlib.suppress(Exception):
            count = await self._memory.vectors.count_tenant(tenant_id)
            self._metrics.memories.labels(tenant_id=tenant_id).set(count)

    def _common_checks(
        self,
        request: memory_service_pb2.RememberRequest | memory_service_pb2.RememberManyRequest,
    ) -> None:
        violations = v.id_violations("request_id", request.request_id, required=True)
        violations += v.short_text_violations("run_id", request.run_id)
        violations += v.short_text_violations("step_id", request.step_id)
        threshold = request.near_duplicate_threshold
        if threshold and not 0.5 <= threshold <= 1.0:
            violations.append(("near_duplicate_threshold", "0, or 0.5 to 1"))
        v.raise_if(violations)

    def _remember_input(
        self,
        item: memory_service_pb2.RememberRequest | memory_service_pb2.RememberItem,
        request: memory_service_pb2.RememberRequest | memory_service_pb2.RememberManyRequest,
        run_id: str,
        prefix: str = "",
    ) -> RememberInput:
        v.check_content(f"{prefix}content", item.content, v.MAX_CONTENT_BYTES)
        metadata = json_format.MessageToDict(item.metadata)
        violations = v.check_json_object(f"{prefix}metadata", metadata, v.METADATA_KEY_RE)
        violations += v.id_violations(f"{prefix}fact_key", item.fact_key, required=False)
        if item.category and not v.CATEGORY_RE.match(item.category):
            violations.append((f"{prefix}category", "1-64 characters of [a-z0-9_.-]"))
        if len(item.entity_refs) > v.MAX_ENTITY_REFS:
            violations.append((f"{prefix}entity_refs", "at most 32 entities"))
        v.raise_if(violations)
        _entity_ref_checks(
            self._types,
            [(f"{prefix}entity_refs[{i}]", r) for i, r in enumerate(item.entity_refs)],
        )
        valid_from = _us(item.valid_from, item.HasField("valid_from"))
        valid_to = _us(item.valid_to, item.HasField("valid_to"))
        start = valid_from if valid_from is not None else now_us()
        if valid_to is not None and valid_to <= start:
            raise errors.validity_range_invalid(f"{prefix}valid_to", "must be after valid_from")
        return RememberInput(
            content=item.content,
            category=item.category or "fact",
            metadata=metadata,
            run_id=run_id,
            step_id=request.step_id,
            valid_from=valid_from,
            valid_to=valid_to,
            dedup_policy=_DEDUP.get(request.dedup_policy, "merge"),
            near_duplicate_threshold=request.near_duplicate_threshold or None,
            fact_key=item.fact_key,
            entity_refs=tuple(entity_key(r.type, r.entity_id) for r in item.entity_refs),
        )

    async def Remember(
        self, request: memory_service_pb2.RememberRequest, context: Any
    ) -> memory_service_pb2.RememberResponse:
        with self._faults():
            principal, scope = _scope(WRITE)
            self._common_checks(request)
            run_id = _run_of(principal, request.run_id)
            item = self._remember_input(request, request, run_id)

            async def work() -> memory_service_pb2.RememberResponse:
                result = await self._memory.remember(scope, item)
                out = memory_service_pb2.RememberResponse(
                    memory=memory_to_proto(result.record),
                    outcome=_REMEMBER_OUTCOMES[result.outcome],
                    similarity=result.similarity,
                )
                if result.superseded is not None:
                    out.superseded_memory.CopyFrom(memory_to_proto(result.superseded))
                return out

            response: memory_service_pb2.RememberResponse = await self._once(
                "Remember",
                scope,
                request.request_id,
                request,
                memory_service_pb2.RememberResponse,
                work,
            )
            await self._count(scope.tenant_id)
            return response

    async def RememberMany(
        self, request: memory_service_pb2.RememberManyRequest, context: Any
    ) -> memory_service_pb2.RememberManyResponse:
        with self._faults():
            principal, scope = _scope(WRITE)
            self._common_checks(request)
            run_id = _run_of(principal, request.run_id)
            if not 1 <= len(request.items) <= 100:
                raise errors.invalid([("items", "1 to 100 items")])
            size = request.ByteSize()
            if size > 8 * 1024 * 1024:
                raise errors.request_too_large("items", 8 * 1024 * 1024, size)
            items = [
                self._remember_input(item, request, run_id, f"items[{i}].")
                for i, item in enumerate(request.items)
            ]

            async def work() -> memory_service_pb2.RememberManyResponse:
                results = await self._memory.remember_many(scope, items)
                out = memory_service_pb2.RememberManyResponse()
                for result in results:
                    entry = out.results.add(
                        memory=memory_to_proto(result.record),
                        outcome=_REMEMBER_OUTCOMES[result.outcome],
                        similarity=result.similarity,
                    )
                    if result.superseded is not None:
                        entry.superseded_memory.CopyFrom(memory_to_proto(result.superseded))
                return out

            response: memory_service_pb2.RememberManyResponse = await self._once(
                "RememberMany",
                scope,
                request.request_id,
                request,
                memory_service_pb2.RememberManyResponse,
                work,
            )
            await self._count(scope.tenant_id)
            return response

    async def Recall(
        self, request: memory_service_pb2.RecallRequest, context: Any
    ) -> memory_service_pb2.RecallResponse:
        started = time.perf_counter()
        with self._faults():
            _, scope = _scope(READ)
            v.check_content("query", request.query, v.MAX_QUERY_BYTES)
            v.check_limit("limit", request.limit, 1, 100)
            if not 0.0 <= request.min_score <= 1.0:
                raise errors.invalid([("min_score", "between 0 and 1")])
            where, as_of, include = _memory_filter(self._types, request.filter, "filter")
            hits = await self._memory.recall(
                scope,
                request.query,
                request.limit,
                where,
                as_of=as_of,
                include_superseded=include,
                min_score=request.min_score,
            )
            at = as_of if as_of is not None else now_us()
            response = memory_service_pb2.RecallResponse(
                memories=[
                    common_memory_pb2.RecalledMemory(
                        memory=memory_to_proto(h.record, at), score=h.score
                    )
                    for h in hits
                ]
            )
        if self._metrics is not None:
            self._metrics.recall_seconds.observe(time.perf_counter() - started)
        return response

    async def GetMemory(
        self, request: memory_service_pb2.GetMemoryRequest, context: Any
    ) -> memory_service_pb2.GetMemoryResponse:
        with self._faults():
            _, scope = _scope(READ)
            _check_memory_id(request.memory_id)
            record = await self._memory.get(scope, request.memory_id)
            return memory_service_pb2.GetMemoryResponse(memory=memory_to_proto(record))

    async def ListMemories(
        self, request: memory_service_pb2.ListMemoriesRequest, context: Any
    ) -> memory_service_pb2.ListMemoriesResponse:
        with self._faults():
            _, scope = _scope(READ)
            size = _page_size(request.page_size, 50, 500)
            where, as_of, include = _memory_filter(self._types, request.filter, "filter")
            fingerprint = request.filter.SerializeToString(deterministic=True).hex()
            token = _read_page_token(request.page_token, "mems", fingerprint)
            if as_of is None and not include:
                # An unset as_of is fixed by the first page so later pages see the same set.
                as_of = int(token.get("t", now_us()))
            records, more = await self._memory.list_memories(
                scope,
                where,
                as_of=as_of,
                include_superseded=include,
                offset=int(token["o"]),
                page_size=size,
            )
            next_token = (
                _page_token("mems", fingerprint, int(token["o"]) + size, {"t": as_of})
                if more
                else ""
            )
            return memory_service_pb2.ListMemoriesResponse(
                memories=[memory_to_proto(r, as_of) for r in records], next_page_token=next_token
            )

    async def UpdateMemory(
        self, request: memory_service_pb2.UpdateMemoryRequest, context: Any
    ) -> memory_service_pb2.UpdateMemoryResponse:
        with self._faults():
            principal, scope = _scope(WRITE)
            run_id = _run_of(principal, request.run_id)
            _check_memory_id(request.memory_id)
            allowed = {"content", "metadata", "category", "valid_to", "entity_refs"}
            paths = list(request.update_mask.paths)
            if paths == ["*"]:
                paths = sorted(allowed)
            elif not paths:
                # AIP-134: an empty mask names every field the request populates.
                populated = {
                    "content": bool(request.content),
                    "metadata": bool(request.metadata.fields),
                    "category": bool(request.category),
                    "valid_to": request.HasField("valid_to"),
                    "entity_refs": bool(request.entity_refs),
                }
                paths = [name for name, present in populated.items() if present]
            violations = v.id_violations("request_id", request.request_id, required=True)
            violations += v.short_text_violations("run_id", request.run_id)
            violations += v.short_text_violations("step_id", request.step_id)
            if not paths:
                violations.append(("update_mask", "name at least one field"))
            violations += [
                (f"update_mask.paths[{i}]", "unknown path")
                for i, p in enumerate(paths)
                if p not in allowed
            ]
            v.raise_if(violations)
            changes: dict[str, Any] = {}
            if "content" in paths:
                v.check_content("content", request.content, v.MAX_CONTENT_BYTES)
                changes["content"] = request.content
            if "metadata" in paths:
                metadata = json_format.MessageToDict(request.metadata)
                v.raise_if(v.check_json_object("metadata", metadata, v.METADATA_KEY_RE))
                changes["metadata"] = metadata
            if "category" in paths:
                if not v.CATEGORY_RE.match(request.category):
                    raise errors.invalid([("category", "1-64 characters of [a-z0-9_.-]")])
                changes["category"] = request.category
            if "valid_to" in paths:
                changes["valid_to"] = (
                    request.valid_to.ToMicroseconds() if request.HasField("valid_to") else OPEN_END
                )
            if "entity_refs" in paths:
                if len(request.entity_refs) > v.MAX_ENTITY_REFS:
                    raise errors.invalid([("entity_refs", "at most 32 entities")])
                refs = list(enumerate(request.entity_refs))
                _entity_ref_checks(self._types, [(f"entity_refs[{i}]", r) for i, r in refs])
                changes["entity_refs"] = [entity_key(r.type, r.entity_id) for _, r in refs]
            effective = (
                request.effective_time.ToMicroseconds()
                if request.HasField("effective_time")
                else None
            )

            async def work() -> memory_service_pb2.UpdateMemoryResponse:
                record, old = await self._memory.update(
                    scope,
                    request.memory_id,
                    changes,
                    effective_time=effective,
                    run_id=run_id,
                    step_id=request.step_id,
                    etag=request.etag,
                )
                out = memory_service_pb2.UpdateMemoryResponse(memory=memory_to_proto(record))
                if old is not None:
                    out.superseded_memory.CopyFrom(memory_to_proto(old))
                return out

            response: memory_service_pb2.UpdateMemoryResponse = await self._once(
                "UpdateMemory",
                scope,
                request.request_id,
                request,
                memory_service_pb2.UpdateMemoryResponse,
                work,
            )
            return response

    async def GetMemoryHistory(
        self, request: memory_service_pb2.GetMemoryHistoryRequest, context: Any
    ) -> memory_service_pb2.GetMemoryHistoryResponse:
        with self._faults():
            _, scope = _scope(READ)
            _check_memory_id(request.memory_id)
            size = _page_size(request.page_size, 50, 500)
            token = _read_page_token(request.page_token, "hist", request.memory_id)
            chain = await self._memory.history(scope, request.memory_id)
            offset = int(token["o"])
            page = chain[offset : offset + size]
            more = offset + size < len(chain)
            return memory_service_pb2.GetMemoryHistoryResponse(
                memories=[memory_to_proto(r) for r in page],
                next_page_token=_page_token("hist", request.memory_id, offset + size)
                if more
                else "",
            )

    async def DeleteMemory(
        self, request: memory_service_pb2.DeleteMemoryRequest, context: Any
    ) -> memory_service_pb2.DeleteMemoryResponse:
        with self._faults():
            _, scope = _scope(WRITE)
            _check_memory_id(request.memory_id)
            record, purged = await self._memory.delete(
                scope, request.memory_id, purge=request.purge, allow_missing=request.allow_missing
            )
            out = memory_service_pb2.DeleteMemoryResponse(purged_version_count=purged)
            if record is not None:
                out.memory.CopyFrom(memory_to_proto(record))
            await self._count(scope.tenant_id)
            return out

    async def ForgetUser(
        self, request: memory_service_pb2.ForgetUserRequest, context: Any
    ) -> memory_service_pb2.ForgetUserResponse:
        with self._faults():
            principal, scope = _scope(FORGET)
            if principal.delegated:
                # Gateway-only: no run may erase a user. The kit's verifier already refuses a
                # delegated principal here; checking again keeps the rule next to the effect.
                raise ServiceError.delegation_not_allowed()
            if len(request.user_id) > 128:
                raise errors.invalid([("user_id", "at most 128 characters")])
            if len(request.subject_entity_refs) > 100:
                raise errors.invalid([("subject_entity_refs", "at most 100 entities")])
            if request.user_id and request.user_id != principal.user_id:
                principal.require(ADMIN)
                scope = Scope(principal.tenant_id, request.user_id)
            _entity_ref_checks(
                self._types,
                [
                    (f"subject_entity_refs[{i}]", r)
                    for i, r in enumerate(request.subject_entity_refs)
                ],
            )
            subjects = [entity_key(r.type, r.entity_id) for r in request.subject_entity_refs]
            memories, entity_versions, rels = await self._memory.forget_user(scope, subjects)
            sessions = await self._working.store.forget_user(scope)
            if self._idempotency is not None:
                await self._idempotency.forget_user(scope.tenant_id, scope.user_id)
            await self._count(scope.tenant_id)
            return memory_service_pb2.ForgetUserResponse(
                user_id=scope.user_id,
                deleted_memory_count=memories,
                deleted_entity_version_count=entity_versions,
                deleted_relationship_version_count=rels,
                deleted_session_count=sessions,
            )


def _check_memory_id(memory_id: str) -> None:
    if not v.UUID_RE.match(memory_id):
        raise errors.invalid([("memory_id", "must be a UUID in canonical text form")])


class EntityMemoryServicer(memory_service_pb2_grpc.EntityMemoryServiceServicer, _Base):
    """foredeck.memory.v1.EntityMemoryService."""

    def __init__(self, graph: GraphStore, types: v.TypeCatalogue, **kwargs: Any) -> None:
        _Base.__init__(self, **kwargs)
        self._graph = graph
        self._types = types

    def _ref(self, path: str, ref: common_memory_pb2.EntityRef) -> tuple[str, str]:
        _entity_ref_checks(self._types, [(path, ref)])
        return ref.type, ref.entity_id

    def _properties(self, path: str, value: struct_pb2.Struct) -> dict[str, Any]:
        props = json_format.MessageToDict(value)
        v.raise_if(v.check_json_object(path, props, v.PROPERTY_KEY_RE))
        return props

    def _validity(
        self,
        path: str,
        valid_from: timestamp_pb2.Timestamp,
        has_from: bool,
        valid_to: timestamp_pb2.Timestamp,
        has_to: bool,
    ) -> tuple[int | None, int | None]:
        start = _us(valid_from, has_from)
        end = _us(valid_to, has_to)
        if end is not None and end <= (start if start is not None else now_us()):
            raise errors.validity_range_invalid(f"{path}.valid_to", "must be after valid_from")
        return start, end

    async def UpsertEntities(
        self, request: memory_service_pb2.UpsertEntitiesRequest, context: Any
    ) -> memory_service_pb2.UpsertEntitiesResponse:
        with self._faults():
            principal, scope = _scope(WRITE)
            run_id = _run_of(principal, request.run_id)
            violations = v.id_violations("request_id", request.request_id, required=True)
            violations += v.short_text_violations("run_id", request.run_id)
            violations += v.short_text_violations("step_id", request.step_id)
            if not 1 <= len(request.entities) <= 100:
                violations.append(("entities", "1 to 100 entities"))
            for i, item in enumerate(request.entities):
                if len(item.name) > 256:
                    violations.append((f"entities[{i}].name", "at most 256 characters"))
            v.raise_if(violations)
            _entity_ref_checks(
                self._types,
                [(f"entities[{i}].entity", e.entity) for i, e in enumerate(request.entities)],
            )
            seen: set[tuple[str, str]] = set()
            items = []
            for i, item in enumerate(request.entities):
                ref = (item.entity.type, item.entity.entity_id)
                if ref in seen:
                    raise errors.invalid([(f"entities[{i}].entity", "the same entity twice")])
                seen.add(ref)
                start, end = self._validity(
                    f"entities[{i}]",
                    item.valid_from,
                    item.HasField("valid_from"),
                    item.valid_to,
                    item.HasField("valid_to"),
                )
                items.append(
                    {
                        "type": ref[0],
                        "entity_id": ref[1],
                        "name": item.name,
                        "properties": self._properties(
                            f"entities[{i}].properties", item.properties
                        ),
                        "properties_mode": _MODES.get(item.properties_mode, "MERGE"),
                        "valid_from": start,
                        "valid_to": end,
                        "user_id": principal.user_id,
                        "run_id": run_id,
                        "step_id": request.step_id,
                    }
                )

            async def work() -> memory_service_pb2.UpsertEntitiesResponse:
                results = await self._graph.upsert_entities(scope.tenant_id, items, now_us())
                return memory_service_pb2.UpsertEntitiesResponse(
                    results=[
                        memory_service_pb2.EntityUpsertResult(
                            entity=entity_to_proto(e), outcome=_UPSERT_OUTCOMES[o]
                        )
                        for e, o in results
                    ]
                )

            response: memory_service_pb2.UpsertEntitiesResponse = await self._once(
                "UpsertEntities",
                scope,
                request.request_id,
                request,
                memory_service_pb2.UpsertEntitiesResponse,
                work,
            )
            return response

    async def UpsertRelationships(
        self, request: memory_service_pb2.UpsertRelationshipsRequest, context: Any
    ) -> memory_service_pb2.UpsertRelationshipsResponse:
        with self._faults():
            principal, scope = _scope(WRITE)
            run_id = _run_of(principal, request.run_id)
            violations = v.id_violations("request_id", request.request_id, required=True)
            violations += v.short_text_violations("run_id", request.run_id)
            violations += v.short_text_violations("step_id", request.step_id)
            if not 1 <= len(request.relationships) <= 100:
                violations.append(("relationships", "1 to 100 relationships"))
            v.raise_if(violations)
            refs = []
            for i, rel in enumerate(request.relationships):
                refs.append((f"relationships[{i}].source", rel.source))
                refs.append((f"relationships[{i}].target", rel.target))
            _entity_ref_checks(self._types, refs)
            self._types.check_relationship_types(
                [(f"relationships[{i}].type", r.type) for i, r in enumerate(request.relationships)]
            )
            seen: set[tuple[str, str, str, str, str]] = set()
            items = []
            for i, rel in enumerate(request.relationships):
                key = (
                    rel.source.type,
                    rel.source.entity_id,
                    rel.type,
                    rel.target.type,
                    rel.target.entity_id,
                )
                if key in seen:
                    raise errors.invalid([(f"relationships[{i}]", "the same relationship twice")])
                seen.add(key)
                start, end = self._validity(
                    f"relationships[{i}]",
                    rel.valid_from,
                    rel.HasField("valid_from"),
                    rel.valid_to,
                    rel.HasField("valid_to"),
                )
                items.append(
                    {
                        "source": (rel.source.type, rel.source.entity_id),
                        "target": (rel.target.type, rel.target.entity_id),
                        "type": rel.type,
                        "properties": self._properties(
                            f"relationships[{i}].properties", rel.properties
                        ),
                        "properties_mode": _MODES.get(rel.properties_mode, "MERGE"),
                        "valid_from": start,
                        "valid_to": end,
                        "exclusive": rel.exclusive,
                        "user_id": principal.user_id,
                        "run_id": run_id,
                        "step_id": request.step_id,
                    }
                )

            async def work() -> memory_service_pb2.UpsertRelationshipsResponse:
                results, created = await self._graph.upsert_relationships(
                    scope.tenant_id, items, now_us(), request.create_missing_entities
                )
                return memory_service_pb2.UpsertRelationshipsResponse(
                    results=[
                        memory_service_pb2.RelationshipUpsertResult(
                            relationship=relationship_to_proto(r),
                            outcome=_UPSERT_OUTCOMES[o],
                            superseded_relationships=[relationship_to_proto(s) for s in sup],
                        )
                        for r, o, sup in results
                    ],
                    created_entities=[entity_to_proto(e) for e in created],
                )

            response: memory_service_pb2.UpsertRelationshipsResponse = await self._once(
                "UpsertRelationships",
                scope,
                request.request_id,
                request,
                memory_service_pb2.UpsertRelationshipsResponse,
                work,
            )
            return response

    async def GetEntity(
        self, request: memory_service_pb2.GetEntityRequest, context: Any
    ) -> memory_service_pb2.GetEntityResponse:
        with self._faults():
            _, scope = _scope(READ)
            entity_type, entity_id = self._ref("entity", request.entity)
            at = request.as_of.ToMicroseconds() if request.HasField("as_of") else now_us()
            found = await self._graph.get_entity(scope.tenant_id, entity_type, entity_id, at)
            if found is None:
                raise errors.entity_not_found(entity_type, entity_id)
            return memory_service_pb2.GetEntityResponse(entity=entity_to_proto(found))

    async def GetNeighborhood(
        self, request: memory_service_pb2.GetNeighborhoodRequest, context: Any
    ) -> memory_service_pb2.GetNeighborhoodResponse:
        with self._faults():
            _, scope = _scope(READ)
            if not 1 <= request.depth <= 3:
                raise errors.depth_out_of_range("depth", request.depth, 1, 3)
            v.check_limit("limit", request.limit, 1, 500)
            if len(request.relationship_types) > v.MAX_FILTER_ITEMS:
                raise errors.invalid([("relationship_types", "at most 16 types")])
            self._types.check_relationship_types(
                [(f"relationship_types[{i}]", t) for i, t in enumerate(request.relationship_types)]
            )
            entity_type, entity_id = self._ref("entity", request.entity)
            at = request.as_of.ToMicroseconds() if request.HasField("as_of") else now_us()
            result = await self._graph.neighbourhood(
                scope.tenant_id,
                entity_type,
                entity_id,
                request.depth,
                list(request.relationship_types),
                _DIRECTIONS.get(request.direction, "BOTH"),
                request.limit,
                at,
            )
            if result is None:
                raise errors.entity_not_found(entity_type, entity_id)
            return memory_service_pb2.GetNeighborhoodResponse(
                entity=entity_to_proto(result.centre),
                neighbors=[
                    entity_pb2.NeighborEntity(entity=entity_to_proto(e), distance=d)
                    for e, d in result.neighbours
                ],
                relationships=[relationship_to_proto(r) for r in result.relationships],
                truncated=result.truncated,
            )

    async def SearchEntities(
        self, request: memory_service_pb2.SearchEntitiesRequest, context: Any
    ) -> memory_service_pb2.SearchEntitiesResponse:
        with self._faults():
            _, scope = _scope(READ)
            if len(request.types) > v.MAX_FILTER_ITEMS:
                raise errors.invalid([("types", "at most 16 types")])
            if len(request.name_prefix) > 256:
                raise errors.invalid([("name_prefix", "at most 256 characters")])
            self._types.check_entity_types(
                [(f"types[{i}]", t) for i, t in enumerate(request.types)]
            )
            size = _page_size(request.page_size, 50, 500)
            fingerprint = f"{','.join(request.types)}\x00{request.name_prefix}"
            token = _read_page_token(request.page_token, "ents", fingerprint)
            at = int(token.get("t", now_us()))
            offset = int(token["o"])
            found = await self._graph.search_entities(
                scope.tenant_id, list(request.types), request.name_prefix, offset, size + 1, at
            )
            more = len(found) > size
            return memory_service_pb2.SearchEntitiesResponse(
                entities=[entity_to_proto(e) for e in found[:size]],
                next_page_token=_page_token("ents", fingerprint, offset + size, {"t": at})
                if more
                else "",
            )

    async def DeleteEntity(
        self, request: memory_service_pb2.DeleteEntityRequest, context: Any
    ) -> memory_service_pb2.DeleteEntityResponse:
        with self._faults():
            _, scope = _scope(WRITE)
            entity_type, entity_id = self._ref("entity", request.entity)
            result = await self._graph.delete_entity(
                scope.tenant_id, entity_type, entity_id, request.purge, now_us()
            )
            if result is None:
                if request.allow_missing:
                    return memory_service_pb2.DeleteEntityResponse()
                raise errors.entity_not_found(entity_type, entity_id)
            entity, rels = result
            return memory_service_pb2.DeleteEntityResponse(
                entity=entity_to_proto(entity), relationship_count=rels
            )

    async def GetEntitySchema(
        self, request: memory_service_pb2.GetEntitySchemaRequest, context: Any
    ) -> memory_service_pb2.GetEntitySchemaResponse:
        with self._faults():
            _scope(READ)
            return memory_service_pb2.GetEntitySchemaResponse(
                entity_types=[
                    entity_pb2.EntityType(name=n, description=d)
                    for n, d in self._types.entity_types
                ],
                relationship_types=[
                    entity_pb2.RelationshipType(name=n, description=d)
                    for n, d in self._types.relationship_types
                ],
            )
