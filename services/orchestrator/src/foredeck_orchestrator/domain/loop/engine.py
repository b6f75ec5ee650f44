"""The plan, act, observe, replan loop that drives one run from its journal to an outcome.

Every step goes through one path, :meth:`_Run._step`: if the journal already holds the step's
final entry, the step is answered from that entry and nothing is called; otherwise the step is
executed, its entry is committed, and the same code reads the result back from the committed
entry. Steps get deterministic ids (``s<index>`` for recall, plan, replan, synthesis and
remember; ``<plan step id>.<n>`` for the steps a plan holds), so a run resumed by another
worker re-issues the same tool effect keys and llmrouter request ids and nothing runs twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import timestamp_pb2
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, TracerProvider

from foredeck.common.v1 import (
    approval_pb2,
    chat_pb2,
    error_pb2,
    journal_pb2,
    memory_pb2,
    run_event_pb2,
    run_pb2,
    tool_pb2,
    usage_pb2,
)
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as llm
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck.toolrunner.v1 import execution_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck_kit.idempotency import tool_effect_key
from foredeck_kit.logs import get_logger
from foredeck_kit.metrics import Metrics
from foredeck_orchestrator.domain.children import ChildRefused, SubAgents
from foredeck_orchestrator.domain.loop import prompts
from foredeck_orchestrator.domain.loop.budget import Spent, check_budget, wall_time_exceeded
from foredeck_orchestrator.domain.loop.errors import (
    CircuitOpenError,
    Code,
    DownstreamError,
    RunFailed,
    make_error,
)
from foredeck_orchestrator.domain.loop.plan import (
    DEFAULT_MAX_PLAN_STEPS,
    PlannedAction,
    PlanRejected,
    ValidPlan,
    parse_plan,
    plan_schema,
)
from foredeck_orchestrator.domain.loop.ports import CallOptions, Downstreams
from foredeck_orchestrator.domain.ports import RunContext, RunOutcome
from foredeck_orchestrator.domain.waiting import ApprovalPending, approval_id_for

__all__ = ["LoopSettings", "PlanActLoop"]

T = TypeVar("T")

_SUCCEEDED = journal_pb2.JOURNAL_ENTRY_OUTCOME_SUCCEEDED
_FAILED = journal_pb2.JOURNAL_ENTRY_OUTCOME_FAILED
_WAITING = journal_pb2.JOURNAL_ENTRY_OUTCOME_WAITING
_FINAL = (_SUCCEEDED, _FAILED)
_REPLANNABLE_TOOL_REASONS = (
    "STEP_FAILED",
    "TOOL_NOT_ALLOWED",
    "APPROVAL_DENIED",
    "APPROVAL_EXPIRED",
)
_FATAL_UPSTREAM_CODES = ("UNAUTHENTICATED", "INTERNAL", "UNKNOWN", "DATA_LOSS")
_MAX_SUMMARY = 256
_MAX_MEMORY_CONTENT = 32 * 1024
_MAX_QUERY = 8 * 1024


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """Defaults and retry policy of the loop.

    ``max_call_attempts`` bounds the attempts of one downstream call that fails transiently
    (UNAVAILABLE, or RESOURCE_EXHAUSTED with RetryInfo); the wait between attempts is the
    downstream's RetryInfo or an exponential backoff from ``initial_backoff``, at most
    ``max_backoff``, and never past the run's deadline.
    """

    default_max_replans: int = 3
    default_recall_limit: int = 5
    max_call_attempts: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 2.0


class PlanActLoop:
    """The orchestrator's :class:`~foredeck_orchestrator.domain.ports.AgentLoop`.

    ``journal_only`` makes every step that the journal does not already hold fail the run with
    REPLAY_DIVERGED instead of calling out: the same loop then re-executes a finished run from
    its journal with no downstream call at all.
    """

    def __init__(
        self,
        downstreams: Downstreams,
        *,
        settings: LoopSettings | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        journal_only: bool = False,
    ) -> None:
        self.downstreams = downstreams
        self.settings = settings or LoopSettings()
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer = provider.get_tracer("foredeck_orchestrator.loop")
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.journal_only = journal_only

    async def execute(self, ctx: RunContext) -> RunOutcome:
        """Run or resume ``ctx.run``; steps already journaled are answered from the journal."""
        entries = list(await ctx.journal.entries())
        return await _Run(self, ctx, entries).drive()


def _text_of(message: chat_pb2.ChatMessage) -> str:
    return "".join(part.text.text for part in message.parts if part.WhichOneof("part") == "text")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _kind_name(kind: run_event_pb2.StepKind.ValueType) -> str:
    return run_event_pb2.StepKind.Name(kind).removeprefix("STEP_KIND_").lower()


class _Run:
    """The state of one run while the loop drives it."""

    def __init__(
        self, loop: PlanActLoop, ctx: RunContext, entries: list[journal_pb2.JournalEntry]
    ) -> None:
        self.loop = loop
        self.ctx = ctx
        self.run = ctx.run
        self.agent = ctx.agent
        self.by_step: dict[str, list[journal_pb2.JournalEntry]] = {}
        for entry in entries:
            self.by_step.setdefault(entry.step_id, []).append(entry)
        self.spent = Spent.from_entries(entries)
        self.last_index = 0
        self.memories: list[memory_pb2.RecalledMemory] = []
        self.observations: list[prompts.Observation] = []
        self.rejections: list[str] = []
        self.replans = 0
        self.executed: set[str] = set()
        self.reused: set[str] = set()
        self.parsed: dict[str, ValidPlan] = {}
        self.deadline = self._deadline()
        self.log = get_logger("foredeck.orchestrator.loop")
        planner = self.agent.planner
        self.max_replans = planner.max_replans or loop.settings.default_max_replans
        self.max_plan_steps = min(max(planner.max_plan_steps or DEFAULT_MAX_PLAN_STEPS, 1), 100)

    def _deadline(self) -> float | None:
        if self.ctx.deadline is not None:
            return self.ctx.deadline
        budget = self.run.budget
        if not budget.HasField("max_wall_time") or not self.run.HasField("start_time"):
            return None
        wall = budget.max_wall_time.ToTimedelta().total_seconds()
        if wall <= 0:
            return None
        started = self.run.start_time.ToNanoseconds() / 1e9
        return self.loop.clock() + (started + wall - time.time())

    # --- the loop -------------------------------------------------------------------------

    async def drive(self) -> RunOutcome:
        try:
            if self.agent.memory_policy.recall_enabled:
                await self._recall()
            actions = (await self._valid_plan(run_event_pb2.STEP_KIND_PLAN)).actions
            position = 0
            while True:
                failure: error_pb2.Error | None = None
                asked = False
                while position < len(actions):
                    action = actions[position]
                    position += 1
                    failure = await self._action(action)
                    if failure is not None:
                        break
                    # A revision the plan asked for is taken while revisions are left; past
                    # the limit the plan goes on as written.
                    if (
                        action.replan_after
                        and not self.agent.planner.replanning_disabled
                        and self.replans < self.max_replans
                    ):
                        asked = True
                        break
                if failure is None and not asked:
                    break
                if failure is not None and self.agent.planner.replanning_disabled:
                    raise RunFailed(failure)
                if self.replans >= self.max_replans:
                    raise RunFailed(self._replan_limit(failure))
                self.replans += 1
                actions = (await self._valid_plan(run_event_pb2.STEP_KIND_REPLAN)).actions
                position = 0
            answer = await self._synthesize()
            if self.agent.memory_policy.remember_results:
                await self._remember(answer)
        except RunFailed as failed:
            await self._publish(
                run_event_pb2.RunEvent(
                    error=run_event_pb2.ErrorOccurred(
                        step_id=failed.error.metadata.get("stepId", ""),
                        error=failed.error,
                        fatal=True,
                    )
                )
            )
            return RunOutcome(
                status=run_pb2.RUN_STATUS_FAILED,
                error=failed.error,
                usage=self._usage(),
                reused_entries=self._reused_entries(),
            )
        return RunOutcome(
            status=run_pb2.RUN_STATUS_SUCCEEDED,
            output=answer,
            usage=self._usage(),
            reused_entries=self._reused_entries(),
        )

    def _reused_entries(self) -> int:
        return sum(len(self.by_step[step_id]) for step_id in self.reused)

    def _usage(self) -> usage_pb2.Usage:
        usage = usage_pb2.Usage()
        usage.CopyFrom(self.spent.usage)
        return usage

    def _replan_limit(self, failure: error_pb2.Error | None) -> error_pb2.Error:
        metadata = {"limit": str(self.max_replans)}
        if failure is not None:
            metadata["lastReason"] = failure.reason
        return make_error(
            Code.RESOURCE_EXHAUSTED,
            "REPLAN_LIMIT",
            "the run needed more plan revisions than its agent allows",
            metadata,
        )

    async def _valid_plan(self, kind: run_event_pb2.StepKind.ValueType) -> ValidPlan:
        """Plan (or replan) until a plan passes validation, within the replan budget."""
        while True:
            entry = await self._plan_step(kind)
            if entry.outcome == _SUCCEEDED:
                parsed = self.parsed.pop(entry.step_id, None)
                if parsed is not None:
                    return parsed
                try:
                    return self._parse(entry)
                except PlanRejected as rejected:
                    # Only when the parsing rules changed since the entry was written.
                    error = rejected.error
            else:
                error = entry.error
                if error.reason not in ("PLAN_INVALID", "TOOL_NOT_ALLOWED"):
                    raise RunFailed(error)
            self.rejections.append(f"{error.reason}: {error.message}")
            if self.agent.planner.replanning_disabled:
                raise RunFailed(error)
            if self.replans >= self.max_replans:
                raise RunFailed(error)
            self.replans += 1
            kind = run_event_pb2.STEP_KIND_REPLAN

    def _parse(self, entry: journal_pb2.JournalEntry) -> ValidPlan:
        return parse_plan(
            _text_of(entry.llm_exchange.response),
            plan_step_id=entry.step_id,
            allowed_tools=self.agent.allowed_tools,
            max_steps=self.max_plan_steps,
            allowed_sub_agents=self.agent.allowed_sub_agents,
        )

    async def _action(self, action: PlannedAction) -> error_pb2.Error | None:
        """Execute one planned step; the error when it failed in a way a new plan may fix."""
        if action.kind == run_event_pb2.STEP_KIND_TOOL_CALL:
            entry = await self._step(
                action.step_id,
                action.kind,
                action.description,
                lambda draft: self._tool_body(draft, action),
                tool_name=action.tool_name,
            )
            if entry.outcome == _WAITING:
                exchange = entry.tool_exchange
                raise ApprovalPending(entry.step_id, exchange.tool_call, exchange.approval_id)
            recorded_call = entry.tool_exchange.tool_call
            if self.loop.journal_only and (
                recorded_call.tool_name != action.tool_name
                or recorded_call.arguments_json != action.arguments_json
            ):
                raise RunFailed(
                    make_error(
                        Code.FAILED_PRECONDITION,
                        "REPLAY_DIVERGED",
                        "the replay calls the tool differently than the journal records",
                        {
                            "runId": self.run.run_id,
                            "stepId": action.step_id,
                            "entryIndex": str(entry.entry_index),
                        },
                    )
                )
            result = entry.tool_exchange.result
            content = result.content if entry.HasField("tool_exchange") else ""
            if entry.outcome == _SUCCEEDED:
                self._observe(action, content, is_error=False)
                return None
            if entry.error.reason not in _REPLANNABLE_TOOL_REASONS or (
                entry.error.metadata.get("upstreamCode") in _FATAL_UPSTREAM_CODES
            ):
                raise RunFailed(entry.error)
            self._observe(action, content or entry.error.message, is_error=True)
            return entry.error
        if action.kind == run_event_pb2.STEP_KIND_SUB_AGENT:
            entry = await self._step(
                action.step_id,
                action.kind,
                action.description,
                lambda draft: self._sub_agent_body(draft, action),
            )
            record = entry.sub_agent
            if entry.outcome == _SUCCEEDED:
                self._observe(action, record.output, is_error=False)
                return None
            if entry.error.reason not in ("STEP_FAILED", "SUB_AGENT_LIMIT"):
                raise RunFailed(entry.error)
            self._observe(action, entry.error.message, is_error=True)
            return entry.error
        entry = await self._step(
            action.step_id,
            action.kind,
            action.description,
            lambda draft: self._reason_body(draft, action),
        )
        if entry.outcome != _SUCCEEDED:
            raise RunFailed(entry.error)
        self._observe(action, _text_of(entry.llm_exchange.response), is_error=False)
        return None

    def _observe(self, action: PlannedAction, content: str, *, is_error: bool) -> None:
        self.observations.append(
            prompts.Observation(
                action.step_id, action.description, action.tool_name, content, is_error
            )
        )

    # --- steps ----------------------------------------------------------------------------

    def _recorded(self, step_id: str) -> journal_pb2.JournalEntry | None:
        entries = self.by_step.get(step_id)
        if entries and entries[-1].outcome in _FINAL:
            return entries[-1]
        return None

    def _next_id(self) -> str:
        return f"s{self.last_index + 1}"

    async def _step(
        self,
        step_id: str,
        kind: run_event_pb2.StepKind.ValueType,
        description: str,
        body: Callable[[journal_pb2.JournalEntry], Awaitable[None]],
        *,
        tool_name: str = "",
        budgeted: bool = True,
    ) -> journal_pb2.JournalEntry:
        """Answer a step from the journal, or execute it and commit its entry."""
        recorded = self._recorded(step_id)
        if recorded is not None:
            self.last_index = max(self.last_index, recorded.step_index)
            self.reused.add(step_id)
            if self.loop.journal_only:
                await self._republish(recorded)
            return recorded
        if budgeted:
            exceeded = check_budget(
                self.run.budget, self.spent, now=self.loop.clock(), deadline=self.deadline
            )
            if exceeded is not None:
                exceeded.metadata["stepId"] = step_id
                raise RunFailed(exceeded)
        if self.loop.journal_only:
            raise RunFailed(
                make_error(
                    Code.FAILED_PRECONDITION,
                    "REPLAY_DIVERGED",
                    "the journal holds no entry for a step the run takes",
                    {"runId": self.run.run_id, "stepId": step_id, "entryIndex": "0"},
                )
            )
        index = self.last_index + 1
        attempt = len(self.by_step.get(step_id, ())) + 1
        kind_name = _kind_name(kind)
        await self._publish(
            run_event_pb2.RunEvent(
                step_started=run_event_pb2.StepStarted(
                    step_id=step_id,
                    step_index=index,
                    kind=kind,
                    description=description,
                    attempt=attempt,
                )
            )
        )
        draft = journal_pb2.JournalEntry(
            step_id=step_id,
            step_index=index,
            kind=kind,
            attempt=attempt,
            description=description,
            start_time=_now(),
        )
        started = self.loop.clock()
        attributes: dict[str, str | int] = {
            "foredeck.run_id": self.run.run_id,
            "foredeck.step_id": step_id,
            "foredeck.step_index": index,
            "foredeck.step_kind": kind_name,
            "foredeck.attempt": attempt,
        }
        if tool_name:
            attributes["foredeck.tool_name"] = tool_name
        with self.loop.tracer.start_as_current_span(
            f"step {kind_name}", attributes=attributes
        ) as span:
            try:
                await body(draft)
                if draft.outcome == journal_pb2.JOURNAL_ENTRY_OUTCOME_UNSPECIFIED:
                    draft.outcome = _SUCCEEDED
            except DownstreamError as error:
                draft.outcome = _FAILED
                draft.error.CopyFrom(self._downstream_error(error, step_id, tool_name))
            except RunFailed as failed:
                draft.outcome = _FAILED
                draft.error.CopyFrom(failed.error)
            except ChildRefused as refused:
                draft.outcome = _FAILED
                draft.error.CopyFrom(refused.error)
                draft.error.metadata["stepId"] = step_id
            if draft.outcome == _FAILED:
                span.set_status(Status(StatusCode.ERROR, draft.error.reason))
                span.set_attribute("foredeck.error_reason", draft.error.reason)
            draft.end_time.CopyFrom(_now())
            stored = await self.ctx.journal.append(draft)
        self.by_step.setdefault(step_id, []).append(stored)
        self.executed.add(step_id)
        self.spent.add(stored)
        self.last_index = max(self.last_index, stored.step_index or index)
        if stored.outcome == _WAITING:
            # Paused, not finished: the step finishes when the run resumes.
            return stored
        latency = self.loop.clock() - started
        success = stored.outcome == _SUCCEEDED
        finished = run_event_pb2.StepFinished(
            step_id=step_id, success=success, summary=_clip(self._summary(stored), _MAX_SUMMARY)
        )
        finished.usage.CopyFrom(stored.usage)
        if not success:
            finished.error.CopyFrom(stored.error)
        await self._publish(run_event_pb2.RunEvent(step_finished=finished))
        self.log.info(
            "step",
            run_id=self.run.run_id,
            step_id=step_id,
            step_index=stored.step_index or index,
            step_kind=kind_name,
            attempt=attempt,
            tool=tool_name,
            outcome="succeeded" if success else "failed",
            reason=stored.error.reason if not success else "",
            input_tokens=stored.usage.input_tokens,
            output_tokens=stored.usage.output_tokens,
            latency_ms=round(latency * 1000, 3),
        )
        return stored

    def _summary(self, entry: journal_pb2.JournalEntry) -> str:
        if entry.outcome != _SUCCEEDED:
            return entry.error.message
        record = entry.WhichOneof("record")
        if entry.HasField("plan"):
            return f"{len(entry.plan.steps)} planned steps"
        if record == "tool_exchange":
            return entry.tool_exchange.result.content
        if record == "llm_exchange":
            return _text_of(entry.llm_exchange.response)
        if record == "memory_operation":
            op = entry.memory_operation
            if op.operation == journal_pb2.MEMORY_OPERATION_KIND_RECALL:
                return f"{len(op.recalled_memories)} memories recalled"
            return f"{len(op.memory_ids)} memories stored"
        return ""

    async def _publish(self, event: run_event_pb2.RunEvent) -> None:
        await self.ctx.events.publish(event)

    async def _republish(self, recorded: journal_pb2.JournalEntry) -> None:
        """A replay's events for a step answered from the journal: the step's start and end
        as the live run published them, so the replay's events can be compared with them."""
        await self._publish(
            run_event_pb2.RunEvent(
                step_started=run_event_pb2.StepStarted(
                    step_id=recorded.step_id,
                    step_index=recorded.step_index,
                    kind=recorded.kind,
                    description=recorded.description,
                    attempt=recorded.attempt,
                )
            )
        )
        finished = run_event_pb2.StepFinished(
            step_id=recorded.step_id,
            success=recorded.outcome == _SUCCEEDED,
            summary=_clip(self._summary(recorded), _MAX_SUMMARY),
        )
        finished.usage.CopyFrom(recorded.usage)
        if recorded.outcome != _SUCCEEDED:
            finished.error.CopyFrom(recorded.error)
        await self._publish(run_event_pb2.RunEvent(step_finished=finished))

    # --- downstream calls -----------------------------------------------------------------

    def _options(self) -> CallOptions:
        return CallOptions(principal=self.ctx.credentials(), deadline=self.deadline)

    async def _call(self, step_id: str, call: Callable[[CallOptions], Awaitable[T]]) -> T:
        """Make one downstream call, retrying transient failures within the run's deadline."""
        settings = self.loop.settings
        attempt = 1
        while True:
            try:
                return await call(self._options())
            except DownstreamError as error:
                if not error.transient or attempt >= settings.max_call_attempts:
                    raise
                delay = error.retry_after
                if delay is None:
                    delay = settings.initial_backoff * 2 ** (attempt - 1)
                delay = min(delay, settings.max_backoff)
                if self.deadline is not None and self.loop.clock() + delay >= self.deadline:
                    raise
                await self._publish(
                    run_event_pb2.RunEvent(
                        error=run_event_pb2.ErrorOccurred(
                            step_id=step_id,
                            error=self._downstream_error(error, step_id, ""),
                            fatal=False,
                        )
                    )
                )
                await self.loop.sleep(delay)
                attempt += 1

    def _downstream_error(
        self, error: DownstreamError, step_id: str, tool_name: str
    ) -> error_pb2.Error:
        """The orchestrator's error for a failed downstream call; the downstream's reason and
        domain are kept in metadata, never its message."""
        upstream = {
            "stepId": step_id,
            "downstream": error.downstream,
            "upstreamReason": error.reason,
            "upstreamDomain": error.domain,
            "upstreamCode": error.code_name,
        }
        if isinstance(error, CircuitOpenError):
            return make_error(
                Code.UNAVAILABLE,
                "CIRCUIT_OPEN",
                f"the circuit breaker in front of {error.downstream} is open",
                {"downstream": error.downstream, "stepId": step_id},
                retry_after=error.retry_after,
            )
        if error.code == Code.DEADLINE_EXCEEDED and (
            error.run_deadline or (self.deadline is not None and self.loop.clock() >= self.deadline)
        ):
            exceeded = wall_time_exceeded(self.run.budget)
            exceeded.metadata["stepId"] = step_id
            return exceeded
        if error.transient or error.code == Code.CANCELLED:
            return make_error(
                Code.UNAVAILABLE,
                "DOWNSTREAM_UNAVAILABLE",
                f"{error.downstream} is unavailable",
                upstream,
                retry_after=error.retry_after or 1.0,
            )
        if tool_name and error.reason == "TOOL_PERMISSION_DENIED":
            return make_error(
                Code.PERMISSION_DENIED,
                "TOOL_NOT_ALLOWED",
                "the run may not call this tool",
                {"toolName": tool_name, **upstream},
            )
        return make_error(
            Code.FAILED_PRECONDITION,
            "STEP_FAILED",
            f"{error.downstream} refused the step's call",
            upstream,
        )

    # --- step bodies ----------------------------------------------------------------------

    def _call_metadata(self, step_id: str) -> generation_pb2.CallMetadata:
        return generation_pb2.CallMetadata(
            run_id=self.run.run_id, step_id=step_id, agent_name=self.agent.name
        )

    def _sampling(self) -> generation_pb2.SamplingParams:
        sampling = generation_pb2.SamplingParams(max_output_tokens=self.agent.max_output_tokens)
        if self.agent.HasField("temperature"):
            sampling.temperature = self.agent.temperature
        return sampling

    def _record_request(
        self,
        draft: journal_pb2.JournalEntry,
        system_prompt: str,
        message: chat_pb2.ChatMessage,
        request_id: str,
        schema: str = "",
    ) -> None:
        exchange = draft.llm_exchange
        exchange.model = self.agent.model
        if system_prompt:
            exchange.messages.append(
                chat_pb2.ChatMessage(
                    role=chat_pb2.ROLE_SYSTEM,
                    parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=system_prompt))],
                )
            )
        exchange.messages.append(message)
        exchange.response_json_schema = schema
        if self.agent.HasField("temperature"):
            exchange.temperature = self.agent.temperature
        exchange.max_output_tokens = self.agent.max_output_tokens
        exchange.idempotency_key = request_id

    def _count_tokens(self, model: str, usage: usage_pb2.Usage) -> None:
        if self.loop.metrics is None:
            return
        counter = self.loop.metrics.agent_llm_tokens_total
        counter.labels(model, "input").inc(
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )
        counter.labels(model, "output").inc(usage.output_tokens)

    async def _generate(
        self,
        draft: journal_pb2.JournalEntry,
        system_prompt: str,
        message: chat_pb2.ChatMessage,
        schema: str = "",
    ) -> None:
        request_id = f"{self.run.run_id}:{draft.step_id}:{draft.attempt}"
        request = llm.GenerateRequest(
            model=self.agent.model,
            system_prompt=system_prompt,
            messages=[message],
            sampling=self._sampling(),
            metadata=self._call_metadata(draft.step_id),
            request_id=request_id,
        )
        if schema:
            request.response_format.CopyFrom(
                generation_pb2.ResponseFormat(
                    type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                    json_schema=schema,
                    schema_name="plan",
                )
            )
        self._record_request(draft, system_prompt, message, request_id, schema)
        llm_client = self.loop.downstreams.llm
        response = await self._call(
            draft.step_id, lambda options: llm_client.generate(request, options)
        )
        exchange = draft.llm_exchange
        exchange.resolved_model = response.model
        exchange.provider = response.provider
        exchange.response.CopyFrom(response.message)
        exchange.finish_reason = generation_pb2.FinishReason.Name(
            response.finish_reason
        ).removeprefix("FINISH_REASON_")
        draft.usage.CopyFrom(response.usage)
        self._count_tokens(response.model or self.agent.model, response.usage)

    async def _plan_step(self, kind: run_event_pb2.StepKind.ValueType) -> journal_pb2.JournalEntry:
        step_id = self._next_id()
        description = "plan the task" if kind == run_event_pb2.STEP_KIND_PLAN else "revise the plan"

        async def body(draft: journal_pb2.JournalEntry) -> None:
            sub_agents = list(self.agent.allowed_sub_agents)
            schema = json.dumps(plan_schema(self.max_plan_steps, bool(sub_agents)), sort_keys=True)
            system = prompts.planner_system_prompt(
                self.agent.system_prompt, list(self.agent.allowed_tools), self.max_plan_steps
            )
            if sub_agents:
                system += (
                    '\n\nA step may also hand a task to another agent: kind "sub_agent", with '
                    '"agent_name" (one of: ' + ", ".join(sorted(sub_agents)) + ") and "
                    '"input" (the task in full). Its answer comes back as the step\'s result.'
                )
            message = prompts.planning_message(
                self.run.input, self.memories, self.observations, self.rejections
            )
            try:
                await self._generate(draft, system, message, schema)
            except DownstreamError as error:
                if error.reason != "STRUCTURED_OUTPUT_INVALID":
                    raise
                raise RunFailed(
                    make_error(
                        Code.FAILED_PRECONDITION,
                        "PLAN_INVALID",
                        "the model's plan did not match the plan schema",
                        {
                            "stepId": draft.step_id,
                            "upstreamReason": error.reason,
                            "upstreamDomain": error.domain,
                        },
                    )
                ) from None
            try:
                plan = self._parse(draft)
            except PlanRejected as rejected:
                draft.outcome = _FAILED
                draft.error.CopyFrom(rejected.error)
                if rejected.plan is not None:
                    draft.plan.CopyFrom(rejected.plan)
                return
            draft.plan.CopyFrom(plan.to_proto())
            self.parsed[draft.step_id] = plan

        return await self._step(step_id, kind, description, body)

    async def _sub_agent_body(self, draft: journal_pb2.JournalEntry, action: PlannedAction) -> None:
        """Start the step's child run (or find it, after a crash) and wait for its end."""
        record = draft.sub_agent
        record.agent_name = action.sub_agent_name
        record.input = action.sub_agent_input
        children: SubAgents | None = self.ctx.children
        if children is None:
            raise ChildRefused(
                make_error(
                    Code.RESOURCE_EXHAUSTED,
                    "SUB_AGENT_LIMIT",
                    "this run cannot start sub-agents",
                    {"parentRunId": self.run.run_id, "budget": "allowed_sub_agents"},
                )
            )
        child_id, version = await children.start(
            draft.step_id, action.sub_agent_name, action.sub_agent_input
        )
        record.child_run_id = child_id
        record.agent_version = version
        draft.child_run_id = child_id
        result = await children.wait(draft.step_id, child_id)
        record.status = result.status
        record.output = result.output
        draft.usage.CopyFrom(result.usage)
        if result.status != run_pb2.RUN_STATUS_SUCCEEDED:
            draft.outcome = _FAILED
            metadata = {"stepId": draft.step_id, "childRunId": child_id}
            if result.error is not None:
                metadata["upstreamReason"] = result.error.reason
                metadata["upstreamDomain"] = result.error.domain
            draft.error.CopyFrom(
                make_error(
                    Code.FAILED_PRECONDITION,
                    "STEP_FAILED",
                    f"the sub-agent run ended {run_pb2.RunStatus.Name(result.status)}",
                    metadata,
                )
            )

    async def _reason_body(self, draft: journal_pb2.JournalEntry, action: PlannedAction) -> None:
        message = prompts.reasoning_message(
            self.run.input, self.memories, self.observations, action.description
        )
        await self._generate(draft, self.agent.system_prompt, message)

    async def _tool_body(self, draft: journal_pb2.JournalEntry, action: PlannedAction) -> None:
        step_id = draft.step_id
        call = tool_pb2.ToolCall(
            tool_call_id=f"call_{step_id}",
            tool_name=action.tool_name,
            arguments_json=action.arguments_json,
        )
        exchange = draft.tool_exchange
        exchange.tool_call.CopyFrom(call)
        exchange.idempotency_key = tool_effect_key(self.run.run_id, step_id)
        policy = self.agent.approval_policy
        approved = self._approved(step_id)
        if policy.all_tools or call.tool_name in policy.tool_names or approved is not None:
            if approved is None:
                await self._wait_for_approval(draft)
                return
            exchange.approval_required = True
            exchange.approval_id = approved.tool_exchange.approval_id
            exchange.approval_status = approval_pb2.APPROVAL_STATUS_APPROVED
        await self._publish(
            run_event_pb2.RunEvent(
                tool_call_requested=run_event_pb2.ToolCallRequested(
                    step_id=step_id,
                    tool_call=call,
                    requires_approval=exchange.approval_required,
                    approval_id=exchange.approval_id,
                )
            )
        )
        approval_token = ""
        if approved is not None and self.ctx.approve is not None:
            approval_token = self.ctx.approve(step_id, call.tool_name, call.arguments_json)
        request = tools.ExecuteToolRequest(
            tool_name=call.tool_name,
            arguments_json=call.arguments_json,
            idempotency_key=exchange.idempotency_key,
            run_id=self.run.run_id,
            step_id=step_id,
            tool_call_id=call.tool_call_id,
            approval_token=approval_token,
        )
        tool_client = self.loop.downstreams.tools
        try:
            response = await self._call(
                step_id, lambda options: tool_client.execute_tool(request, options)
            )
        except DownstreamError as error:
            if error.reason == "APPROVAL_REQUIRED" and not approval_token:
                # The tool's own registration asks for a person: nothing ran, so wait for one.
                await self._wait_for_approval(draft)
                return
            mapped = self._downstream_error(error, step_id, call.tool_name)
            exchange.result.CopyFrom(
                tool_pb2.ToolResult(
                    tool_call_id=call.tool_call_id, content=mapped.message, is_error=True
                )
            )
            await self._tool_finished(draft, replayed=False)
            raise
        outcome = response.outcome
        if outcome.WhichOneof("outcome") == "output":
            result = tool_pb2.ToolResult(
                tool_call_id=call.tool_call_id,
                content=prompts.tool_content(outcome.output.output_json),
            )
        else:
            failure = outcome.error
            result = tool_pb2.ToolResult(
                tool_call_id=call.tool_call_id,
                content=failure.message or "the tool failed",
                is_error=True,
            )
            draft.outcome = _FAILED
            draft.error.CopyFrom(
                make_error(
                    Code.FAILED_PRECONDITION,
                    "STEP_FAILED",
                    "the tool reported a failure",
                    {
                        "stepId": step_id,
                        "toolName": call.tool_name,
                        "downstream": "toolrunner",
                        "toolErrorKind": execution_pb2.ToolErrorKind.Name(
                            failure.kind
                        ).removeprefix("TOOL_ERROR_KIND_"),
                        "retryable": "true" if failure.retryable else "false",
                    },
                )
            )
        exchange.result.CopyFrom(result)
        exchange.replayed = response.replayed
        exchange.duration.CopyFrom(response.duration)
        await self._tool_finished(draft, replayed=response.replayed)

    def _approved(self, step_id: str) -> journal_pb2.JournalEntry | None:
        """The journaled approval of the step's tool call, if a person granted one."""
        for entry in reversed(self.by_step.get(step_id, ())):
            if entry.tool_exchange.approval_status == approval_pb2.APPROVAL_STATUS_APPROVED:
                return entry
        return None

    async def _wait_for_approval(self, draft: journal_pb2.JournalEntry) -> None:
        """Journal the step as waiting for a person's decision on its call."""
        exchange = draft.tool_exchange
        exchange.ClearField("result")
        exchange.approval_required = True
        exchange.approval_id = approval_id_for(self.run.run_id, draft.step_id)
        exchange.approval_status = approval_pb2.APPROVAL_STATUS_PENDING
        draft.outcome = _WAITING
        draft.ClearField("error")
        await self._publish(
            run_event_pb2.RunEvent(
                tool_call_requested=run_event_pb2.ToolCallRequested(
                    step_id=draft.step_id,
                    tool_call=exchange.tool_call,
                    requires_approval=True,
                    approval_id=exchange.approval_id,
                )
            )
        )

    async def _tool_finished(self, draft: journal_pb2.JournalEntry, *, replayed: bool) -> None:
        exchange = draft.tool_exchange
        finished = run_event_pb2.ToolCallFinished(
            step_id=draft.step_id, result=exchange.result, replayed=replayed
        )
        finished.duration.CopyFrom(exchange.duration)
        await self._publish(run_event_pb2.RunEvent(tool_call_finished=finished))
        if self.loop.metrics is not None:
            self.loop.metrics.agent_tool_calls_total.labels(
                exchange.tool_call.tool_name, "false" if exchange.result.is_error else "true"
            ).inc()

    async def _recall(self) -> None:
        policy = self.agent.memory_policy
        limit = policy.recall_limit or self.loop.settings.default_recall_limit
        query = _clip(self.run.input, _MAX_QUERY)

        async def body(draft: journal_pb2.JournalEntry) -> None:
            operation = draft.memory_operation
            operation.operation = journal_pb2.MEMORY_OPERATION_KIND_RECALL
            operation.memory_kind = run_event_pb2.MEMORY_KIND_LONG_TERM
            operation.query = query
            operation.limit = limit
            memory = self.loop.downstreams.memory
            request = mem.RecallRequest(query=query, limit=limit)
            response = await self._call(
                draft.step_id, lambda options: memory.recall(request, options)
            )
            operation.recalled_memories.extend(response.memories)

        entry = await self._step(
            self._next_id(), run_event_pb2.STEP_KIND_RECALL, "recall memories", body
        )
        if entry.outcome == _SUCCEEDED:
            self.memories = list(entry.memory_operation.recalled_memories)
        else:
            # A run goes on without memories rather than fail because memory is down.
            await self._nonfatal(entry)

    async def _synthesize(self) -> str:
        async def body(draft: journal_pb2.JournalEntry) -> None:
            message = prompts.synthesis_message(self.run.input, self.memories, self.observations)
            request_id = f"{self.run.run_id}:{draft.step_id}:{draft.attempt}"
            request = llm.StreamGenerateRequest(
                model=self.agent.model,
                system_prompt=self.agent.system_prompt,
                messages=[message],
                sampling=self._sampling(),
                metadata=self._call_metadata(draft.step_id),
                request_id=request_id,
            )
            self._record_request(draft, self.agent.system_prompt, message, request_id)
            await self._call(draft.step_id, lambda options: self._stream(draft, request, options))

        entry = await self._step(
            self._next_id(), run_event_pb2.STEP_KIND_SYNTHESIZE, "write the final answer", body
        )
        if entry.outcome != _SUCCEEDED:
            raise RunFailed(entry.error)
        return _text_of(entry.llm_exchange.response)

    async def _stream(
        self,
        draft: journal_pb2.JournalEntry,
        request: llm.StreamGenerateRequest,
        options: CallOptions,
    ) -> None:
        """Consume one StreamGenerate call, publishing each text delta as it arrives."""
        text: list[str] = []
        exchange = draft.llm_exchange
        events: AsyncIterator[llm.StreamGenerateResponse] = (
            self.loop.downstreams.llm.stream_generate(request, options)
        )
        async for event in events:
            which = event.WhichOneof("event")
            if which == "started":
                exchange.resolved_model = event.started.model
                exchange.provider = event.started.provider
            elif which == "text_delta":
                text.append(event.text_delta.text)
                await self._publish(
                    run_event_pb2.RunEvent(
                        token_delta=run_event_pb2.TokenDelta(
                            step_id=draft.step_id, text=event.text_delta.text
                        )
                    )
                )
            elif which == "usage":
                draft.usage.CopyFrom(event.usage)
            elif which == "finished":
                draft.usage.CopyFrom(event.finished.usage)
                exchange.finish_reason = generation_pb2.FinishReason.Name(
                    event.finished.finish_reason
                ).removeprefix("FINISH_REASON_")
            elif which == "failed":
                failed = event.failed
                draft.usage.CopyFrom(failed.usage)
                error = DownstreamError(
                    "llmrouter",
                    failed.error.code or Code.UNAVAILABLE,
                    "UNAVAILABLE" if failed.error.code == Code.UNAVAILABLE else "FAILED",
                    reason=failed.error.reason,
                    domain=failed.error.domain,
                    retry_after=(
                        failed.error.retry_delay.ToTimedelta().total_seconds()
                        if failed.error.HasField("retry_delay")
                        else None
                    ),
                )
                if text:
                    # Deltas already reached watchers: a second generation would repeat them.
                    raise RunFailed(self._downstream_error(error, draft.step_id, ""))
                raise error
        exchange.response.CopyFrom(
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_ASSISTANT,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="".join(text)))],
            )
        )
        self._count_tokens(exchange.resolved_model or self.agent.model, draft.usage)

    async def _remember(self, answer: str) -> None:
        remaining = None if self.deadline is None else self.deadline - self.loop.clock()
        if remaining is not None and remaining <= 0:
            return
        content = _clip(f"Task: {self.run.input}\n\nAnswer: {answer}", _MAX_MEMORY_CONTENT)
        step_id = self._next_id()
        request_id = f"{self.run.run_id}:{step_id}"
        if len(request_id) > 128:
            request_id = hashlib.sha256(request_id.encode()).hexdigest()

        async def body(draft: journal_pb2.JournalEntry) -> None:
            operation = draft.memory_operation
            operation.operation = journal_pb2.MEMORY_OPERATION_KIND_REMEMBER
            operation.memory_kind = run_event_pb2.MEMORY_KIND_LONG_TERM
            operation.contents.append(content)
            memory = self.loop.downstreams.memory
            request = mem.RememberRequest(
                request_id=request_id,
                content=content,
                category="run_summary",
                run_id=self.run.run_id,
                step_id=draft.step_id,
            )
            response = await self._call(
                draft.step_id, lambda options: memory.remember(request, options)
            )
            operation.memory_ids.append(response.memory.memory_id)
            await self._publish(
                run_event_pb2.RunEvent(
                    memory_stored=run_event_pb2.MemoryStored(
                        step_id=draft.step_id,
                        memory_id=response.memory.memory_id,
                        kind=run_event_pb2.MEMORY_KIND_LONG_TERM,
                    )
                )
            )

        entry = await self._step(
            step_id, run_event_pb2.STEP_KIND_REMEMBER, "remember the run", body, budgeted=False
        )
        if entry.outcome != _SUCCEEDED:
            await self._nonfatal(entry)

    async def _nonfatal(self, entry: journal_pb2.JournalEntry) -> None:
        if entry.step_id not in self.executed:
            return
        await self._publish(
            run_event_pb2.RunEvent(
                error=run_event_pb2.ErrorOccurred(
                    step_id=entry.step_id, error=entry.error, fatal=False
                )
            )
        )
