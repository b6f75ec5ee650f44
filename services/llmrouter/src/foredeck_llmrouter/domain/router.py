"""The routing use cases: generate, stream and embed along a fallback chain.

For each model of the chain the router asks the shared circuit breaker for admission, calls the
provider, retries what may be retried (honouring the provider's retry-after) while the caller's
deadline allows, and moves to the next model on rate limits, exhausted quota, outages, timeouts
and open circuits. Client faults (bad request, credentials, unknown provider model) end the call
at once. Every attempt is reported back to the caller.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import jsonschema

from foredeck_llmrouter.domain.assembly import (
    Assembler,
    TextOut,
    ToolArgsOut,
    ToolStartOut,
    finish_for_parts,
)
from foredeck_llmrouter.domain.catalog import Catalog, ModelKind, ModelSpec, ProviderSpec
from foredeck_llmrouter.domain.errors import Failure, ProviderFailure, RouterError
from foredeck_llmrouter.domain.model import (
    ChatRequest,
    Completion,
    EmbeddingResult,
    FinishReason,
    OutputFormat,
    ProviderCall,
    ProviderEvent,
    StreamEnd,
    StreamStart,
    Text,
    TextChunk,
    ToolArgumentsChunk,
    ToolCall,
    ToolCallBegin,
    ToolCallEnd,
    Usage,
    UsageUpdate,
)
from foredeck_llmrouter.domain.policy import RetryPolicy, cost_usd_micros
from foredeck_llmrouter.domain.ports import (
    Admission,
    CallObserver,
    CallRecord,
    ChatProvider,
    CircuitSnapshot,
    CircuitStore,
    EmbeddingProvider,
)

T = TypeVar("T")


class AttemptOutcome(enum.Enum):
    """What became of one attempt."""

    SUCCEEDED = "succeeded"
    RETRIED = "retried"
    FELL_BACK = "fell_back"
    SKIPPED_CIRCUIT_OPEN = "skipped_circuit_open"
    FAILED = "failed"


@dataclass(frozen=True)
class Attempt:
    """One provider attempt (or a model skipped for its open circuit)."""

    provider: str
    model: str
    outcome: AttemptOutcome
    error_reason: str = ""
    upstream_status: int = 0
    seconds: float = 0.0
    retry_after: float | None = None


@dataclass
class Generation:
    """A finished generation and how it was obtained."""

    generation_id: str
    requested_model: str
    provider: str
    model: str
    completion: Completion
    attempts: list[Attempt]


@dataclass(frozen=True)
class Started:
    """The stream committed to a provider: its first output arrived."""

    generation_id: str
    requested_model: str
    provider: str
    model: str
    provider_response_id: str
    prior_attempts: list[Attempt]


@dataclass(frozen=True)
class UsageOut:
    """Cumulative usage of the answering call."""

    usage: Usage


@dataclass(frozen=True)
class Finished:
    """The stream ended normally."""

    finish_reason: FinishReason
    matched_stop_sequence: str
    usage: Usage
    attempts: list[Attempt]


@dataclass(frozen=True)
class Failed:
    """The stream ended with a failure after output was sent."""

    error: RouterError
    partial_parts: list[Text | ToolCall]
    incomplete_tool_call_ids: list[str]
    usage: Usage
    attempts: list[Attempt]


StreamItem = Started | TextOut | ToolStartOut | ToolArgsOut | UsageOut | Finished | Failed

_CONTENT_EVENTS = (TextChunk, ToolCallBegin, ToolArgumentsChunk, StreamEnd)


@dataclass
class _ChainState:
    attempts: list[Attempt] = field(default_factory=list)
    failures: list[tuple[ModelSpec, ProviderFailure]] = field(default_factory=list)
    refused: list[tuple[ModelSpec, float]] = field(default_factory=list)


class Router:
    """Routes chat and embedding calls to providers with retries, fallback and circuits."""

    def __init__(
        self,
        catalog: Catalog,
        chat_providers: Mapping[str, ChatProvider],
        embedding_providers: Mapping[str, EmbeddingProvider],
        circuits: CircuitStore,
        policy: RetryPolicy,
        observer: CallObserver,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self._chat = chat_providers
        self._embed = embedding_providers
        self._circuits = circuits
        self._policy = policy
        self._observer = observer
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()

    # -- entry points -------------------------------------------------------------------------

    def plan(self, request: ChatRequest, tenant_id: str) -> list[ModelSpec]:
        """Resolve the requested model and its fallbacks, checking each can serve the request."""
        first = self.catalog.resolve(request.model, ModelKind.CHAT, tenant_id)
        chain = self.catalog.chain(first, request.fallback_models, request.disable_fallback)
        for model in chain:
            check_capabilities(model, request)
        return chain

    async def generate(
        self, request: ChatRequest, tenant_id: str, deadline: float | None
    ) -> Generation:
        """The next assistant message, whole."""
        chain = self.plan(request, tenant_id)
        self._check_deadline(deadline)
        state = _ChainState()

        async def call(model: ModelSpec, provider_call: ProviderCall) -> Completion:
            provider = self._chat[model.provider]
            started_ns = time.time_ns()
            began = self._clock()
            try:
                async with asyncio.timeout(provider_call.timeout):
                    completion = await provider.complete(provider_call)
            except TimeoutError:
                failure = ProviderFailure(Failure.TIMEOUT)
                self._observe(model, provider_call, began, started_ns, None, None, failure)
                raise failure from None
            except ProviderFailure as failure:
                self._observe(model, provider_call, began, started_ns, None, None, failure)
                raise
            completion.parts = [
                p for p in completion.parts if not (isinstance(p, Text) and not p.text)
            ]
            completion.finish_reason = finish_for_parts(completion.finish_reason, completion.parts)
            completion.usage.cost_usd_micros = cost_usd_micros(completion.usage, model.pricing)
            self._observe(model, provider_call, began, started_ns, None, completion, None)
            return completion

        model, completion = await self._run_chain(request, chain, deadline, state, call)
        check_structured_output(request, model, completion.parts)
        return Generation(
            generation_id=_new_id(),
            requested_model=request.model or chain[0].name,
            provider=model.provider,
            model=model.name,
            completion=completion,
            attempts=state.attempts,
        )

    async def stream(
        self, request: ChatRequest, tenant_id: str, deadline: float | None
    ) -> AsyncIterator[StreamItem]:
        """The next assistant message as typed deltas.

        Failures before the first output fail over like `generate`; a failure after it ends
        the stream with `Failed` carrying everything already sent.
        """
        chain = self.plan(request, tenant_id)
        for model in chain:
            if not model.capabilities.streaming:
                raise _capability_error(model, "streaming", "model")
        self._check_deadline(deadline)
        state = _ChainState()
        generation_id = _new_id()

        @dataclass
        class Opened:
            events: AsyncIterator[ProviderEvent]
            buffered: list[ProviderEvent]
            began: float
            started_ns: int
            call: ProviderCall

        async def open_stream(model: ModelSpec, provider_call: ProviderCall) -> Opened:
            provider = self._chat[model.provider]
            started_ns = time.time_ns()
            began = self._clock()
            events = provider.stream(provider_call)
            buffered: list[ProviderEvent] = []
            try:
                async with asyncio.timeout(provider_call.timeout):
                    async for event in events:
                        buffered.append(event)
                        if isinstance(event, _CONTENT_EVENTS):
                            break
                    else:
                        raise ProviderFailure(Failure.RESPONSE_INVALID)
            except TimeoutError:
                await _close(events)
                failure = ProviderFailure(Failure.TIMEOUT)
                self._observe(model, provider_call, began, started_ns, None, None, failure)
                raise failure from None
            except BaseException as error:
                await _close(events)
                if isinstance(error, ProviderFailure):
                    self._observe(model, provider_call, began, started_ns, None, None, error)
                raise
            return Opened(events, buffered, began, started_ns, provider_call)

        model, opened = await self._run_chain(request, chain, deadline, state, open_stream)
        first_token = self._clock() - opened.began
        response_id = next(
            (e.provider_response_id for e in opened.buffered if isinstance(e, StreamStart)), ""
        )
        yield Started(
            generation_id=generation_id,
            requested_model=request.model or chain[0].name,
            provider=model.provider,
            model=model.name,
            provider_response_id=response_id,
            prior_attempts=list(state.attempts[:-1]),
        )
        assembler = Assembler()
        finish: StreamEnd | None = None
        try:
            async for event in _chain_events(opened.buffered, opened.events):
                if isinstance(event, TextChunk):
                    if event.text:
                        yield assembler.text(event.text)
                elif isinstance(event, ToolCallBegin):
                    yield assembler.tool_begin(event)
                elif isinstance(event, ToolArgumentsChunk):
                    out = assembler.tool_arguments(event)
                    if out is not None and event.fragment:
                        yield out
                elif isinstance(event, ToolCallEnd):
                    assembler.tool_end(event.key)
                elif isinstance(event, UsageUpdate):
                    assembler.update_usage(event.usage)
                    assembler.usage.cost_usd_micros = cost_usd_micros(
                        assembler.usage, model.pricing
                    )
                    yield UsageOut(_copy_usage(assembler.usage))
                elif isinstance(event, StreamEnd):
                    finish = event
                    break
            if finish is None:
                raise ProviderFailure(Failure.RESPONSE_INVALID)
        except ProviderFailure as failure:
            await _close(opened.events)
            if failure.kind.trips_circuit:
                await self._circuits.record_failure(
                    model.provider, model.name, failure.kind.value, probe=False
                )
            self._observe(
                model, opened.call, opened.began, opened.started_ns, first_token, None, failure
            )
            state.attempts[-1] = Attempt(
                model.provider,
                model.name,
                AttemptOutcome.FAILED,
                "STREAM_INTERRUPTED",
                failure.upstream_status,
                self._clock() - opened.began,
                failure.retry_after,
            )
            yield Failed(
                error=RouterError(
                    "STREAM_INTERRUPTED",
                    "the provider failed after output was streamed",
                    metadata={
                        "provider": model.provider,
                        "model": model.name,
                        "upstreamReason": failure.kind.value,
                    },
                    retry_after=failure.retry_after,
                ),
                partial_parts=assembler.message_parts(),
                incomplete_tool_call_ids=assembler.incomplete_tool_call_ids(),
                usage=_copy_usage(assembler.usage),
                attempts=state.attempts,
            )
            return
        finally:
            await _close(opened.events)
        assembler.end_all()
        parts = assembler.message_parts()
        completion = Completion(
            parts=parts,
            finish_reason=finish_for_parts(finish.finish_reason, parts),
            usage=assembler.usage,
            provider_response_id=response_id,
            matched_stop_sequence=finish.matched_stop_sequence,
        )
        self._observe(
            model, opened.call, opened.began, opened.started_ns, first_token, completion, None
        )
        state.attempts[-1] = Attempt(
            model.provider,
            model.name,
            AttemptOutcome.SUCCEEDED,
            seconds=self._clock() - opened.began,
        )
        try:
            check_structured_output(request, model, parts)
        except RouterError as error:
            yield Failed(error, parts, [], _copy_usage(assembler.usage), state.attempts)
            return
        yield Finished(
            finish_reason=completion.finish_reason,
            matched_stop_sequence=finish.matched_stop_sequence,
            usage=_copy_usage(assembler.usage),
            attempts=state.attempts,
        )

    async def embed(
        self,
        requested: str,
        texts: Sequence[str],
        dimensions: int,
        deadline: float | None,
    ) -> tuple[ModelSpec, EmbeddingResult, list[Attempt]]:
        """Vectors for ``texts`` from one model; retried, never failed over."""
        model = self.catalog.resolve(requested, ModelKind.EMBEDDING)
        if dimensions and not model.capabilities.embedding_dimensions:
            raise _capability_error(model, "dimensions", "dimensions")
        if model.embedding_dimensions and dimensions > model.embedding_dimensions:
            raise RouterError(
                "INVALID_REQUEST",
                "invalid request",
                field_violations=[
                    ("dimensions", f"at most the model's {model.embedding_dimensions}")
                ],
            )
        self._check_deadline(deadline)
        provider = self._embed.get(model.provider)
        if provider is None:
            raise _capability_error(model, "embeddings", "model")
        state = _ChainState()

        async def call(model: ModelSpec, provider_call: ProviderCall) -> EmbeddingResult:
            began, started_ns = self._clock(), time.time_ns()
            try:
                async with asyncio.timeout(provider_call.timeout):
                    result = await provider.embed(
                        model.provider_model, texts, dimensions, provider_call.timeout
                    )
            except TimeoutError:
                failure = ProviderFailure(Failure.TIMEOUT)
                self._observe(
                    model, provider_call, began, started_ns, None, None, failure, "embeddings"
                )
                raise failure from None
            except ProviderFailure as failure:
                self._observe(
                    model, provider_call, began, started_ns, None, None, failure, "embeddings"
                )
                raise
            result.usage.cost_usd_micros = cost_usd_micros(result.usage, model.pricing)
            completion = Completion([], FinishReason.STOP, result.usage)
            self._observe(
                model, provider_call, began, started_ns, None, completion, None, "embeddings"
            )
            return result

        placeholder = ChatRequest(model=model.name, messages=())
        model, result = await self._run_chain(placeholder, [model], deadline, state, call)
        return model, result, state.attempts

    async def circuit(self, provider: str, model: str) -> CircuitSnapshot:
        """The shared circuit breaker state of one provider and model."""
        return await self._circuits.snapshot(provider, model)

    # -- the chain ----------------------------------------------------------------------------

    def _check_deadline(self, deadline: float | None) -> None:
        if deadline is not None and deadline - self._clock() < self._policy.min_attempt_time:
            raise RouterError(
                "DEADLINE_TOO_SHORT",
                "deadline too short to call a provider",
                metadata={"minimumSeconds": f"{self._policy.min_attempt_time:g}"},
            )

    async def _run_chain(
        self,
        request: ChatRequest,
        chain: list[ModelSpec],
        deadline: float | None,
        state: _ChainState,
        call: Callable[[ModelSpec, ProviderCall], Awaitable[T]],
    ) -> tuple[ModelSpec, T]:
        for position, model in enumerate(chain):
            last_model = position == len(chain) - 1
            provider = self.catalog.providers[model.provider]
            if not provider.credentials_configured:
                raise _auth_error(provider, model, 0)
            admission = await self._circuits.admit(model.provider, model.name)
            if not admission.allowed:
                state.attempts.append(
                    Attempt(
                        model.provider,
                        model.name,
                        AttemptOutcome.SKIPPED_CIRCUIT_OPEN,
                        "CIRCUIT_OPEN",
                        retry_after=admission.retry_after,
                    )
                )
                state.refused.append((model, admission.retry_after))
                continue
            attempt = 1
            while True:
                remaining = self._remaining(deadline)
                if remaining is not None and remaining < self._policy.min_attempt_time:
                    await self._release(model, admission)
                    raise self._final_error(state)
                timeout = self._policy.attempt_timeout
                if remaining is not None:
                    timeout = min(timeout, remaining)
                provider_call = ProviderCall(
                    request=request,
                    provider_model=model.provider_model,
                    max_output_tokens=_max_output(request, model),
                    timeout=timeout,
                )
                began = self._clock()
                try:
                    result = await call(model, provider_call)
                except ProviderFailure as failure:
                    seconds = self._clock() - began
                    state.failures.append((model, failure))
                    if failure.kind.trips_circuit:
                        await self._circuits.record_failure(
                            model.provider, model.name, failure.kind.value, admission.probe
                        )
                    elif admission.probe:
                        await self._circuits.release_probe(model.provider, model.name)
                    admission = Admission(allowed=True)
                    if failure.kind is Failure.AUTH_FAILED:
                        state.attempts.append(
                            _attempt(model, AttemptOutcome.FAILED, failure, seconds)
                        )
                        raise _auth_error(provider, model, failure.upstream_status) from None
                    delay = self._retry_delay(attempt, failure, deadline)
                    if delay is not None:
                        state.attempts.append(
                            _attempt(model, AttemptOutcome.RETRIED, failure, seconds)
                        )
                        await self._sleep(delay)
                        admission = await self._circuits.admit(model.provider, model.name)
                        if admission.allowed:
                            attempt += 1
                            continue
                        state.refused.append((model, admission.retry_after))
                        break
                    if failure.kind.falls_back and not last_model:
                        state.attempts.append(
                            _attempt(model, AttemptOutcome.FELL_BACK, failure, seconds)
                        )
                        break
                    state.attempts.append(_attempt(model, AttemptOutcome.FAILED, failure, seconds))
                    if not failure.kind.falls_back:
                        raise _single_error(model, failure, len(_calls(state))) from None
                    raise self._final_error(state) from None
                except BaseException:
                    await self._release(model, admission)
                    raise
                await self._circuits.record_success(model.provider, model.name, admission.probe)
                state.attempts.append(
                    Attempt(
                        model.provider,
                        model.name,
                        AttemptOutcome.SUCCEEDED,
                        seconds=self._clock() - began,
                    )
                )
                return model, result
        raise self._final_error(state)

    async def _release(self, model: ModelSpec, admission: Admission) -> None:
        if admission.probe:
            await asyncio.shield(self._circuits.release_probe(model.provider, model.name))

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - self._clock()

    def _retry_delay(
        self, attempt: int, failure: ProviderFailure, deadline: float | None
    ) -> float | None:
        if not failure.may_retry or attempt >= self._policy.max_attempts:
            return None
        delay = self._policy.delay(attempt, failure, self._rng)
        if delay is None:
            return None
        remaining = self._remaining(deadline)
        if remaining is not None and delay + self._policy.min_attempt_time > remaining:
            return None
        return delay

    def _final_error(self, state: _ChainState) -> RouterError:
        """The error for a chain that ran out, from everything that was tried."""
        calls = _calls(state)
        if not state.failures:
            if state.refused:
                models = ",".join(dict.fromkeys(m.name for m, _ in state.refused))
                return RouterError(
                    "CIRCUIT_OPEN",
                    "every model's circuit breaker is open",
                    metadata={"models": models},
                    retry_after=max(0.001, min(r for _, r in state.refused)),
                )
            return RouterError(
                "DEADLINE_TOO_SHORT",
                "deadline too short to call a provider",
                metadata={"minimumSeconds": f"{self._policy.min_attempt_time:g}"},
            )
        kinds = {f.kind for _, f in state.failures}
        last_model, last = state.failures[-1]
        if len(kinds) == 1 and not state.refused:
            return _single_error(last_model, last, len(calls), [f for _, f in state.failures])
        return RouterError(
            "ALL_PROVIDERS_FAILED",
            "every model in the fallback chain failed",
            metadata={
                "attempts": str(len(calls)),
                "models": ",".join(dict.fromkeys(a.model for a in state.attempts)),
                "lastReason": last.kind.value,
            },
            retry_after=1.0,
        )

    def _observe(
        self,
        model: ModelSpec,
        call: ProviderCall,
        began: float,
        started_ns: int,
        first_token: float | None,
        completion: Completion | None,
        failure: ProviderFailure | None,
        operation: str = "chat",
    ) -> None:
        provider: ProviderSpec = self.catalog.providers[model.provider]
        self._observer.record(
            CallRecord(
                provider=model.provider,
                gen_ai_system=provider.gen_ai_system,
                model=model.name,
                provider_model=model.provider_model,
                operation=operation,
                outcome="error" if failure else "ok",
                seconds=self._clock() - began,
                time_to_first_token=first_token,
                usage=completion.usage if completion else None,
                finish_reason=completion.finish_reason.value if completion else "",
                error_reason=failure.kind.value if failure else "",
                upstream_status=failure.upstream_status if failure else 200,
                max_output_tokens=call.max_output_tokens,
                temperature=call.request.sampling.temperature,
                response_id=completion.provider_response_id if completion else "",
            ),
            started_ns,
        )


# -- helpers ------------------------------------------------------------------------------------


def _new_id() -> str:
    return "gen_" + uuid.uuid4().hex


def _copy_usage(usage: Usage) -> Usage:
    return Usage(
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
        usage.cost_usd_micros,
    )


async def _close(events: AsyncIterator[ProviderEvent]) -> None:
    closer = getattr(events, "aclose", None)
    if closer is not None:
        await asyncio.shield(closer())


async def _chain_events(
    first: list[ProviderEvent], rest: AsyncIterator[ProviderEvent]
) -> AsyncIterator[ProviderEvent]:
    for event in first:
        yield event
    async for event in rest:
        yield event


def _calls(state: _ChainState) -> list[Attempt]:
    return [a for a in state.attempts if a.outcome is not AttemptOutcome.SKIPPED_CIRCUIT_OPEN]


def _attempt(
    model: ModelSpec, outcome: AttemptOutcome, failure: ProviderFailure, seconds: float
) -> Attempt:
    return Attempt(
        model.provider,
        model.name,
        outcome,
        failure.kind.value,
        failure.upstream_status,
        seconds,
        failure.retry_after,
    )


def _max_output(request: ChatRequest, model: ModelSpec) -> int:
    wanted = request.sampling.max_output_tokens
    return model.max_output_tokens if wanted <= 0 else min(wanted, model.max_output_tokens)


def _auth_error(provider: ProviderSpec, model: ModelSpec, status: int) -> RouterError:
    return RouterError(
        "PROVIDER_AUTH_FAILED",
        "the provider refused the router's credentials",
        metadata={"provider": provider.name, "model": model.name, "upstreamStatus": str(status)},
    )


def _single_error(
    model: ModelSpec,
    failure: ProviderFailure,
    attempts: int,
    all_failures: list[ProviderFailure] | None = None,
) -> RouterError:
    """The error for a chain whose every attempt failed the same way (or one that must stop)."""
    kind = failure.kind
    metadata = {"provider": model.provider, "model": model.name}
    retry_after: float | None = None
    if kind is Failure.RATE_LIMITED:
        waits = [f.retry_after for f in (all_failures or [failure]) if f.retry_after is not None]
        retry_after = min(waits) if waits else 1.0
        metadata["attempts"] = str(attempts)
    elif kind in (Failure.UNAVAILABLE, Failure.RESPONSE_INVALID):
        metadata["upstreamStatus"] = str(failure.upstream_status)
        metadata["attempts"] = str(attempts)
        retry_after = 1.0
    elif kind is Failure.TIMEOUT:
        metadata["attempts"] = str(attempts)
    elif kind is Failure.REJECTED:
        metadata["upstreamStatus"] = str(failure.upstream_status)
        if failure.upstream_error_type:
            metadata["upstreamErrorType"] = failure.upstream_error_type
    elif kind is Failure.MODEL_NOT_FOUND:
        metadata["providerModel"] = model.provider_model
    elif kind is Failure.CONTEXT_WINDOW:
        metadata = {
            "model": model.name,
            "maxOutputTokens": str(model.max_output_tokens),
            "contextWindowTokens": str(model.context_window_tokens),
        }
        return RouterError(
            kind.value,
            "input and output do not fit the model's context window",
            metadata=metadata,
            field_violations=[("messages", "too long for the model's context window")],
        )
    messages = {
        Failure.RATE_LIMITED: "the provider rate limited every attempt",
        Failure.QUOTA_EXHAUSTED: "the provider account's quota is used up",
        Failure.UNAVAILABLE: "the provider is unavailable",
        Failure.TIMEOUT: "the provider did not answer in time",
        Failure.REJECTED: "the provider rejected the request",
        Failure.MODEL_NOT_FOUND: "the provider does not know the configured model",
        Failure.RESPONSE_INVALID: "the provider's answer could not be understood",
        Failure.CONTENT_FILTERED: "the provider refused the input under its content policy",
        Failure.AUTH_FAILED: "the provider refused the router's credentials",
    }
    return RouterError(kind.value, messages[kind], metadata=metadata, retry_after=retry_after)


def _capability_error(model: ModelSpec, capability: str, field_path: str) -> RouterError:
    return RouterError(
        "MODEL_CAPABILITY_UNSUPPORTED",
        "model cannot serve this request",
        metadata={"model": model.name, "capability": capability},
        field_violations=[(field_path, f"model {model.name} lacks {capability}")],
    )


def check_capabilities(model: ModelSpec, request: ChatRequest) -> None:
    """Fail when the request needs something the model cannot do."""
    caps = model.capabilities
    if request.tools and not caps.tools:
        raise _capability_error(model, "tools", "tools")
    if request.response_format.kind is OutputFormat.JSON_SCHEMA and not caps.json_schema:
        raise _capability_error(model, "jsonSchema", "response_format")
    if request.response_format.kind is OutputFormat.JSON_OBJECT and not (
        caps.json_object or caps.json_schema
    ):
        raise _capability_error(model, "jsonSchema", "response_format")
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.parts):
            if type(part).__name__ == "Image" and not caps.vision:
                raise _capability_error(model, "vision", f"messages[{i}].parts[{j}]")


def check_structured_output(
    request: ChatRequest, model: ModelSpec, parts: list[Text | ToolCall]
) -> None:
    """Fail when a JSON response format was asked for and the text does not satisfy it."""
    fmt = request.response_format
    if fmt.kind is OutputFormat.TEXT:
        return
    text = "".join(p.text for p in parts if isinstance(p, Text))
    metadata = {"model": model.name, "schemaName": fmt.name}
    try:
        value = json.loads(text)
    except ValueError:
        raise RouterError(
            "STRUCTURED_OUTPUT_INVALID",
            "the output is not JSON",
            metadata={**metadata, "violationPath": ""},
        ) from None
    if fmt.kind is OutputFormat.JSON_OBJECT or fmt.schema is None:
        if not isinstance(value, dict):
            raise RouterError(
                "STRUCTURED_OUTPUT_INVALID",
                "the output is not a JSON object",
                metadata={**metadata, "violationPath": ""},
            )
        return
    validator = jsonschema.Draft202012Validator(fmt.schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        pointer = "".join(f"/{p}" for p in error.absolute_path)
        raise RouterError(
            "STRUCTURED_OUTPUT_INVALID",
            "the output does not satisfy the requested schema",
            metadata={**metadata, "violationPath": pointer},
        )
