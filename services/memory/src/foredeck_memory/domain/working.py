"""Working memory: ordered session logs, token-budgeted context windows, stored summaries.

Messages are kept as the contract's ``SessionMessage`` and ``Summary`` messages (plain data,
no gRPC). A summary is stored beside the messages it covers and never replaces them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from foredeck.common.v1 import chat_pb2, usage_pb2
from foredeck.memory.v1 import session_pb2
from foredeck_memory.domain import errors
from foredeck_memory.domain.errors import Fault, FaultKind
from foredeck_memory.domain.models import Scope, now_us

MESSAGE_FRAMING_TOKENS = 4
"""Tokens added per message for its role and separators, as chat templates do."""
IMAGE_TOKENS = 256
"""A flat estimate for an image part, which a text tokenizer cannot count."""

SUMMARY_PROMPT = (
    "You condense the earlier part of a conversation between a user and an AI agent. Write a "
    "faithful, compact summary that keeps every fact, decision, open question, name, number "
    "and tool result the agent may need later. Write plain prose, no preamble."
)


@dataclass(frozen=True)
class SessionMeta:
    """A session's counters and times (microseconds)."""

    session_id: str
    last_sequence: int
    message_count: int
    summary_count: int
    current_summary_id: str
    create_time: int
    update_time: int
    expire_time: int


@dataclass(frozen=True)
class AppendOutcome:
    """What an append did: the sequences given and the session after it."""

    first_sequence: int
    last_sequence: int
    meta: SessionMeta


class SessionStore(Protocol):
    """Sessions, their messages and summaries, partitioned by tenant and user."""

    async def append(
        self,
        scope: Scope,
        session_id: str,
        messages: Sequence[bytes],
        expected_last_sequence: int | None,
        ttl_ms: int,
        max_messages: int,
        at: int,
    ) -> AppendOutcome: ...

    async def meta(self, scope: Scope, session_id: str) -> SessionMeta | None: ...

    async def messages(
        self, scope: Scope, session_id: str, after_sequence: int, count: int
    ) -> list[session_pb2.SessionMessage]: ...

    async def summaries(self, scope: Scope, session_id: str) -> list[session_pb2.Summary]: ...

    async def put_summary(
        self,
        scope: Scope,
        session_id: str,
        summary: session_pb2.Summary,
        replaced: session_pb2.Summary | None,
    ) -> bool: ...

    async def clear(self, scope: Scope, session_id: str) -> tuple[int, int]: ...

    async def forget_user(self, scope: Scope) -> int: ...

    def lock(self, scope: Scope, session_id: str) -> Any: ...


class Summariser(Protocol):
    """Writes a summary of a transcript (llmrouter in production, a scripted server in tests)."""

    async def summarise(
        self, model: str, system_prompt: str, transcript: str, max_tokens: int, request_id: str
    ) -> Any: ...


@dataclass(frozen=True)
class ContextWindow:
    """A context window as GetContextWindow returns it."""

    system_message: session_pb2.SessionMessage | None
    summary: session_pb2.Summary | None
    messages: list[session_pb2.SessionMessage]
    system_tokens: int
    summary_tokens: int
    message_tokens: int
    tokenizer: str
    summarized: bool
    usage: usage_pb2.Usage | None
    omitted: int
    last_sequence: int


def message_text(message: chat_pb2.ChatMessage) -> tuple[str, int]:
    """The countable text of a message and the flat token cost of parts text cannot hold."""
    texts: list[str] = []
    extra = 0
    for part in message.parts:
        kind = part.WhichOneof("part")
        if kind == "text":
            texts.append(part.text.text)
        elif kind == "tool_call":
            texts.append(f"{part.tool_call.tool_name} {part.tool_call.arguments_json}")
        elif kind == "tool_result":
            texts.append(part.tool_result.content)
        elif kind == "image":
            extra += IMAGE_TOKENS
    return "\n".join(texts), extra


_ROLE_NAMES = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}


class WorkingMemory:
    """Session logs in a :class:`SessionStore`, windows counted by ``count_tokens``."""

    def __init__(
        self,
        *,
        store: SessionStore,
        count_tokens: Callable[[str], int],
        tokenizer_name: str,
        summariser: Summariser | None,
        default_summary_model: str,
        default_ttl_seconds: int,
        max_messages: int,
    ) -> None:
        self.store = store
        self._count = count_tokens
        self.tokenizer_name = tokenizer_name
        self._summariser = summariser
        self._summary_model = default_summary_model
        self.default_ttl_seconds = default_ttl_seconds
        self.max_messages = max_messages

    def message_tokens(self, message: chat_pb2.ChatMessage) -> int:
        """Tokens a message takes in a window, framing included."""
        text, extra = message_text(message)
        return self._count(text) + extra + MESSAGE_FRAMING_TOKENS

    async def append(
        self,
        scope: Scope,
        session_id: str,
        messages: Sequence[chat_pb2.ChatMessage],
        *,
        run_id: str,
        step_id: str,
        expected_last_sequence: int | None,
        ttl_seconds: int | None,
    ) -> tuple[list[int], SessionMeta]:
        """Append messages in order; return their sequence numbers and the session."""
        at = now_us()
        encoded = []
        for message in messages:
            stored = session_pb2.SessionMessage(message=message, run_id=run_id, step_id=step_id)
            stored.create_time.FromMicroseconds(at)
            encoded.append(stored.SerializeToString(deterministic=True))
        ttl = ttl_seconds or self.default_ttl_seconds
        outcome = await self.store.append(
            scope, session_id, encoded, expected_last_sequence, ttl * 1000, self.max_messages, at
        )
        return list(range(outcome.first_sequence, outcome.last_sequence + 1)), outcome.meta

    async def require(self, scope: Scope, session_id: str) -> SessionMeta:
        """The session's meta, or SESSION_NOT_FOUND."""
        meta = await self.store.meta(scope, session_id)
        if meta is None:
            raise errors.session_not_found(session_id)
        return meta

    async def list_messages(
        self, scope: Scope, session_id: str, after_sequence: int, page_size: int
    ) -> tuple[list[session_pb2.SessionMessage], list[session_pb2.Summary], SessionMeta, bool]:
        """A page of messages after ``after_sequence`` with the summaries covering them."""
        meta = await self.require(scope, session_id)
        page = await self.store.messages(scope, session_id, after_sequence, page_size + 1)
        more = len(page) > page_size
        page = page[:page_size]
        summaries = sorted(
            await self.store.summaries(scope, session_id),
            key=lambda s: s.create_time.ToNanoseconds(),
        )
        covering = []
        if page:
            low, high = page[0].sequence, page[-1].sequence
            covering = [s for s in summaries if s.first_sequence <= high and s.last_sequence >= low]
        for message in page:
            newest = [
                s for s in summaries if s.first_sequence <= message.sequence <= s.last_sequence
            ]
            if newest:
                message.summary_id = newest[-1].summary_id
        return page, covering, meta, more

    async def context_window(
        self,
        scope: Scope,
        session_id: str,
        *,
        token_budget: int,
        summarize: bool,
        summary_model: str,
        max_summary_tokens: int,
    ) -> ContextWindow:
        """The window of the session that fits ``token_budget``, summarising when needed."""
        meta = await self.require(scope, session_id)
        window = await self._build(
            scope, session_id, meta, token_budget, summarize, max_summary_tokens, None
        )
        if isinstance(window, ContextWindow):
            return window
        # The window needs a new summary: take the session's summary lock so each range is
        # summarised once, then rebuild from what is stored now (another caller may have won).
        async with self.store.lock(scope, session_id):
            meta = await self.require(scope, session_id)
            again = await self._build(
                scope, session_id, meta, token_budget, summarize, max_summary_tokens, None
            )
            if isinstance(again, ContextWindow):
                return again
            summary, usage = await self._summarise(
                scope, session_id, again, summary_model or self._summary_model, max_summary_tokens
            )
            built = await self._build(
                scope,
                session_id,
                meta,
                token_budget,
                summarize,
                max_summary_tokens,
                (summary, usage),
            )
            assert isinstance(built, ContextWindow)
            return built

    async def _build(
        self,
        scope: Scope,
        session_id: str,
        meta: SessionMeta,
        budget: int,
        summarize: bool,
        max_summary_tokens: int,
        fresh: tuple[session_pb2.Summary, usage_pb2.Usage] | None,
    ) -> ContextWindow | _FoldPlan:
        messages = await self.store.messages(scope, session_id, 0, meta.last_sequence + 1)
        summaries = {s.summary_id: s for s in await self.store.summaries(scope, session_id)}
        current = fresh[0] if fresh is not None else summaries.get(meta.current_summary_id)
        system = None
        for message in messages:
            if message.message.role == chat_pb2.ROLE_SYSTEM:
                system = message
        covered = current.last_sequence if current is not None else 0
        turns = [
            m for m in messages if m.message.role != chat_pb2.ROLE_SYSTEM and m.sequence > covered
        ]
        units: list[list[session_pb2.SessionMessage]] = []
        for message in turns:
            if message.message.role == chat_pb2.ROLE_TOOL and units:
                units[-1].append(message)
            else:
                units.append([message])
        for message in turns:
            message.token_count = self.message_tokens(message.message)
        system_tokens = self.message_tokens(system.message) if system is not None else 0
        summary_tokens = self.message_tokens(current.message) if current is not None else 0
        if current is not None:
            current.token_count = summary_tokens
        if system is not None:
            system.token_count = system_tokens

        def take(avail: int) -> int:
            used, count = 0, 0
            for unit in reversed(units):
                cost = sum(m.token_count for m in unit)
                if used + cost > avail:
                    break
                used += cost
                count += 1
            return count

        avail = budget - system_tokens - summary_tokens
        kept = take(avail) if avail >= 0 else 0
        if kept == len(units) or not summarize or fresh is not None:
            if avail < 0 or (units and kept == 0):
                newest = sum(m.token_count for m in units[-1]) if units else 0
                raise self._too_small(budget, system_tokens + summary_tokens + newest)
            recent = [m for unit in units[len(units) - kept :] for m in unit]
            omitted = sum(len(unit) for unit in units[: len(units) - kept])
            usage = fresh[1] if fresh is not None else None
            return ContextWindow(
                system_message=system,
                summary=current,
                messages=recent,
                system_tokens=system_tokens,
                summary_tokens=summary_tokens,
                message_tokens=sum(m.token_count for m in recent),
                tokenizer=self.tokenizer_name,
                summarized=fresh is not None,
                usage=usage,
                omitted=omitted,
                last_sequence=meta.last_sequence,
            )
        max_summary = max_summary_tokens or budget // 4
        room = budget - system_tokens - max_summary
        keep = take(room) if room > 0 else 0
        if keep == 0:
            newest = sum(m.token_count for m in units[-1])
            raise self._too_small(budget, system_tokens + max_summary + newest)
        fold = [m for unit in units[: len(units) - keep] for m in unit]
        return _FoldPlan(previous=current, fold=fold, max_summary_tokens=max_summary)

    def _too_small(self, budget: int, required: int) -> Fault:
        return Fault(
            FaultKind.PRECONDITION,
            "TOKEN_BUDGET_TOO_SMALL",
            "the token budget cannot hold the window",
            metadata={
                "tokenBudget": str(budget),
                "requiredTokens": str(required),
                "tokenizer": self.tokenizer_name,
            },
        )

    async def _summarise(
        self,
        scope: Scope,
        session_id: str,
        plan: _FoldPlan,
        model: str,
        max_summary_tokens: int,
    ) -> tuple[session_pb2.Summary, usage_pb2.Usage]:
        if self._summariser is None:
            raise Fault(
                FaultKind.UNAVAILABLE,
                "SUMMARIZATION_FAILED",
                "no summariser is configured",
                metadata={"model": model},
                retry_after=timedelta(seconds=30),
            )
        lines = []
        if plan.previous is not None:
            previous_text, _ = message_text(plan.previous.message)
            lines.append(f"[summary of earlier turns]\n{previous_text}")
        for message in plan.fold:
            text, _ = message_text(message.message)
            role = _ROLE_NAMES.get(message.message.role, "user")
            lines.append(f"[{role}] {text}")
        first = plan.previous.first_sequence if plan.previous else plan.fold[0].sequence
        last = plan.fold[-1].sequence
        # The request id names the range, so llmrouter's own idempotency dedupes retries.
        request_id = f"summary.{uuid.uuid5(uuid.NAMESPACE_URL, f'{session_id}:{first}:{last}')}"
        result = await self._summariser.summarise(
            model, SUMMARY_PROMPT, "\n\n".join(lines), plan.max_summary_tokens, request_id
        )
        text = self._fit(result.text, plan.max_summary_tokens - MESSAGE_FRAMING_TOKENS)
        summary = session_pb2.Summary(
            summary_id=str(uuid.uuid4()),
            message=chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_SYSTEM,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))],
            ),
            first_sequence=first,
            last_sequence=last,
            replaces_summary_id=plan.previous.summary_id if plan.previous else "",
            model=result.model,
            usage=usage_pb2.Usage(
                input_tokens=result.input_tokens, output_tokens=result.output_tokens
            ),
        )
        summary.create_time.FromMicroseconds(now_us())
        replaced = None
        if plan.previous is not None:
            replaced = session_pb2.Summary()
            replaced.CopyFrom(plan.previous)
            replaced.token_count = 0
            replaced.replaced_by_summary_id = summary.summary_id
        stored = await self.store.put_summary(scope, session_id, summary, replaced)
        if not stored:
            raise Fault(
                FaultKind.UNAVAILABLE,
                "SUMMARIZATION_FAILED",
                "the session changed while it was summarised",
                metadata={"model": model},
                retry_after=timedelta(milliseconds=100),
            )
        return summary, summary.usage

    def _fit(self, text: str, max_tokens: int) -> str:
        """Cut a summary that came back longer than asked at a word boundary."""
        if self._count(text) <= max_tokens:
            return text
        words = text.split()
        low, high = 0, len(words)
        while low < high:
            middle = (low + high + 1) // 2
            if self._count(" ".join(words[:middle])) <= max_tokens:
                low = middle
            else:
                high = middle - 1
        return " ".join(words[:low])


@dataclass(frozen=True)
class _FoldPlan:
    previous: session_pb2.Summary | None
    fold: list[session_pb2.SessionMessage]
    max_summary_tokens: int
