"""What the agent loop's tests share: the run runtime's journal and events kept in memory,
run contexts, and plan texts as a model would write them.

The in-memory journal and event stream stand in for the runtime (its Redis storage is tested
with the runtime), not for a downstream service.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from google.protobuf.duration_pb2 import Duration

from foredeck.common.v1 import (
    agent_pb2,
    chat_pb2,
    journal_pb2,
    memory_pb2,
    run_event_pb2,
    run_pb2,
    usage_pb2,
)
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as llm
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck.toolrunner.v1 import execution_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck_orchestrator.domain.loop.errors import DownstreamError
from foredeck_orchestrator.domain.loop.ports import CallOptions, Downstreams
from foredeck_orchestrator.domain.ports import LeaseLost, RunContext


class MemoryJournal:
    """A run's journal in memory, with the runtime's numbering; ``lose_lease`` fences it."""

    def __init__(self, run_id: str, entries: Sequence[journal_pb2.JournalEntry] = ()) -> None:
        self.run_id = run_id
        self.stored: list[journal_pb2.JournalEntry] = [self._copy(e) for e in entries]
        self.lease_lost = False
        self.appends = 0

    @staticmethod
    def _copy(entry: journal_pb2.JournalEntry) -> journal_pb2.JournalEntry:
        copy = journal_pb2.JournalEntry()
        copy.CopyFrom(entry)
        return copy

    async def entries(self) -> Sequence[journal_pb2.JournalEntry]:
        return [self._copy(e) for e in self.stored]

    async def append(self, entry: journal_pb2.JournalEntry) -> journal_pb2.JournalEntry:
        if self.lease_lost:
            raise LeaseLost(self.run_id)
        stored = self._copy(entry)
        stored.run_id = self.run_id
        stored.entry_index = len(self.stored) + 1
        stored.worker_id = "test/1"
        stored.fencing_token = 1
        self.stored.append(stored)
        self.appends += 1
        return self._copy(stored)


class MemoryEvents:
    """A run's event stream in memory."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.events: list[run_event_pb2.RunEvent] = []

    async def publish(self, event: run_event_pb2.RunEvent) -> str:
        stored = run_event_pb2.RunEvent()
        stored.CopyFrom(event)
        stored.run_id = self.run_id
        stored.sequence = len(self.events) + 1
        stored.event_id = f"{stored.sequence}-0"
        self.events.append(stored)
        return stored.event_id

    def of(self, kind: str) -> list[Any]:
        """The payloads of every event of one kind (a ``payload`` oneof field name)."""
        return [getattr(e, kind) for e in self.events if e.WhichOneof("payload") == kind]


def make_agent(
    *,
    tools: Sequence[str] = ("calculator", "search"),
    recall: bool = False,
    remember: bool = False,
    max_replans: int = 0,
    replanning_disabled: bool = False,
    max_plan_steps: int = 0,
    system_prompt: str = "You are a careful assistant.",
) -> agent_pb2.Agent:
    """An agent version as the runtime would pin a run to."""
    return agent_pb2.Agent(
        name="helper",
        version=1,
        tenant_id="tenant-a",
        system_prompt=system_prompt,
        model="gpt-4o-mini",
        allowed_tools=list(tools),
        memory_policy=agent_pb2.MemoryPolicy(recall_enabled=recall, remember_results=remember),
        planner=agent_pb2.PlannerSettings(
            max_replans=max_replans,
            replanning_disabled=replanning_disabled,
            max_plan_steps=max_plan_steps,
        ),
    )


def make_run(
    run_id: str = "run-1",
    task: str = "What is 6 times 7?",
    *,
    max_steps: int = 0,
    max_tokens: int = 0,
    max_cost: int = 0,
    max_wall_seconds: int = 0,
) -> run_pb2.Run:
    """A run as the runtime hands it to the loop."""
    budget = usage_pb2.Budget(
        max_steps=max_steps, max_tokens=max_tokens, max_cost_usd_micros=max_cost
    )
    if max_wall_seconds:
        budget.max_wall_time.CopyFrom(Duration(seconds=max_wall_seconds))
    return run_pb2.Run(
        run_id=run_id,
        tenant_id="tenant-a",
        user_id="user-a",
        agent_name="helper",
        agent_version=1,
        input=task,
        status=run_pb2.RUN_STATUS_RUNNING,
        budget=budget,
    )


def make_context(
    run: run_pb2.Run,
    agent: agent_pb2.Agent,
    journal: MemoryJournal,
    events: MemoryEvents,
    *,
    credentials: Callable[[], str] = lambda: "principal-token",
    deadline: float | None = None,
) -> RunContext:
    """The context the runtime gives the loop for one held run."""
    return RunContext(
        run=run,
        agent=agent,
        journal=journal,
        events=events,
        worker_id="test/1",
        credentials=credentials,
        deadline=deadline,
    )


def tool_step(
    tool: str, arguments: dict[str, Any], description: str = "", *, replan_after: bool = False
) -> dict[str, Any]:
    """A tool-call step of a plan, as the model writes it."""
    step: dict[str, Any] = {
        "kind": "tool_call",
        "description": description or f"call {tool}",
        "tool_name": tool,
        "arguments": arguments,
    }
    if replan_after:
        step["replan_after"] = True
    return step


def reason_step(description: str) -> dict[str, Any]:
    """A reasoning step of a plan, as the model writes it."""
    return {"kind": "reason", "description": description}


def plan_text(*steps: dict[str, Any], rationale: str = "") -> str:
    """A plan as the model's JSON output."""
    return json.dumps({"rationale": rationale, "steps": list(steps)})


# --- in-memory downstream ports, for the loop's unit tests ---------------------------------


ANSWER_CHUNKS = ("The answer ", "is ", "42.")
USAGE = usage_pb2.Usage(input_tokens=10, output_tokens=5, cost_usd_micros=3)


def assistant(text: str) -> chat_pb2.ChatMessage:
    """An assistant message holding ``text``."""
    return chat_pb2.ChatMessage(
        role=chat_pb2.ROLE_ASSISTANT,
        parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))],
    )


def tool_output(value: Any) -> execution_pb2.ToolOutcome:
    """A successful tool outcome."""
    return execution_pb2.ToolOutcome(output=execution_pb2.ToolOutput(output_json=json.dumps(value)))


def tool_failure(message: str) -> execution_pb2.ToolOutcome:
    """A tool outcome reporting the tool's own failure."""
    return execution_pb2.ToolOutcome(
        error=execution_pb2.ToolError(
            kind=execution_pb2.TOOL_ERROR_KIND_TOOL_FAILED, message=message
        )
    )


class Scripted:
    """llmrouter, toolrunner and memory in memory, answering from a script and counting calls.

    ``plans`` maps the step id of a plan step to the model's plan text (step ids are
    deterministic, so a resumed run asks for the same ones); a reasoning call answers
    ``reasoned: <step>``; synthesis streams :data:`ANSWER_CHUNKS`. ``tool_outcomes`` maps a
    tool name to its outcome. ``fail_next`` holds errors raised by the next calls, in order.
    """

    def __init__(
        self,
        plans: dict[str, str],
        tool_outcomes: dict[str, execution_pb2.ToolOutcome] | None = None,
        memories: Sequence[str] = (),
    ) -> None:
        self.plans = plans
        self.tool_outcomes = tool_outcomes or {"calculator": tool_output(42)}
        self.memories = list(memories)
        self.calls: list[tuple[str, str]] = []
        self.principals: list[str] = []
        self.fail_next: list[DownstreamError] = []
        self.generate_requests: list[llm.GenerateRequest] = []
        self.stream_requests: list[llm.StreamGenerateRequest] = []
        self.tool_requests: list[tools.ExecuteToolRequest] = []
        self.remember_requests: list[mem.RememberRequest] = []

    @property
    def ports(self) -> Downstreams:
        return Downstreams(llm=self, tools=self, memory=self)

    def _enter(self, kind: str, key: str, options: CallOptions) -> None:
        self.principals.append(options.principal)
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.calls.append((kind, key))

    async def generate(
        self, request: llm.GenerateRequest, options: CallOptions
    ) -> llm.GenerateResponse:
        self._enter("generate", request.request_id, options)
        self.generate_requests.append(request)
        step_id = request.metadata.step_id
        if request.response_format.json_schema:
            text = self.plans[step_id]
        else:
            prompt = request.messages[-1].parts[0].text.text
            text = "reasoned: " + prompt.rsplit("\n", 1)[-1]
        return llm.GenerateResponse(
            message=assistant(text),
            finish_reason=generation_pb2.FINISH_REASON_STOP,
            usage=USAGE,
            provider="scripted",
            model=request.model,
        )

    async def stream_generate(
        self, request: llm.StreamGenerateRequest, options: CallOptions
    ) -> AsyncIterator[llm.StreamGenerateResponse]:
        self._enter("stream", request.request_id, options)
        self.stream_requests.append(request)
        yield llm.StreamGenerateResponse(
            started=generation_pb2.GenerationStarted(provider="scripted", model=request.model)
        )
        for chunk in ANSWER_CHUNKS:
            yield llm.StreamGenerateResponse(
                text_delta=generation_pb2.TextDelta(part_index=0, text=chunk)
            )
        yield llm.StreamGenerateResponse(
            finished=generation_pb2.GenerationFinished(
                finish_reason=generation_pb2.FINISH_REASON_STOP, usage=USAGE
            )
        )

    async def execute_tool(
        self, request: tools.ExecuteToolRequest, options: CallOptions
    ) -> tools.ExecuteToolResponse:
        self._enter("tool", request.idempotency_key, options)
        self.tool_requests.append(request)
        return tools.ExecuteToolResponse(
            tool_name=request.tool_name,
            tool_call_id=request.tool_call_id,
            outcome=self.tool_outcomes[request.tool_name],
        )

    async def recall(self, request: mem.RecallRequest, options: CallOptions) -> mem.RecallResponse:
        self._enter("recall", request.query, options)
        return mem.RecallResponse(
            memories=[
                memory_pb2.RecalledMemory(
                    memory=memory_pb2.Memory(memory_id=f"m{i}", content=content), score=0.9
                )
                for i, content in enumerate(self.memories)
            ]
        )

    async def remember(
        self, request: mem.RememberRequest, options: CallOptions
    ) -> mem.RememberResponse:
        self._enter("remember", request.request_id, options)
        self.remember_requests.append(request)
        return mem.RememberResponse(
            memory=memory_pb2.Memory(memory_id="m-new", content=request.content)
        )
