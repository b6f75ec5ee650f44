"""Protobuf messages to and from the router's domain types, with request validation.

Validation collects every bad field of a request before failing, so a caller fixes them in one
round: general problems as INVALID_REQUEST, tool schemas as INVALID_TOOL_SCHEMA and the
response schema as RESPONSE_SCHEMA_INVALID, each with one BadRequest violation per field.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import jsonschema
from google.protobuf import duration_pb2, timestamp_pb2

from foredeck.common.v1 import chat_pb2, error_pb2, tool_pb2, usage_pb2
from foredeck.llmrouter.v1 import (
    generation_pb2,
    llmrouter_service_pb2,
    model_pb2,
    provider_pb2,
)
from foredeck_llmrouter.domain.assembly import TextOut, ToolArgsOut, ToolStartOut
from foredeck_llmrouter.domain.catalog import Catalog, ModelKind, ModelSpec, ProviderKind
from foredeck_llmrouter.domain.errors import RouterError, invalid_request
from foredeck_llmrouter.domain.model import (
    ChatRequest,
    FinishReason,
    Image,
    Message,
    OutputFormat,
    Part,
    ResponseFormat,
    Role,
    Sampling,
    Text,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolResult,
    ToolSpec,
    Usage,
)
from foredeck_llmrouter.domain.ports import CircuitSnapshot, CircuitState
from foredeck_llmrouter.domain.router import (
    Attempt,
    AttemptOutcome,
    Failed,
    Finished,
    Generation,
    Started,
    StreamItem,
    UsageOut,
)

DOMAIN = "llmrouter.foredeck.dev"
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_REQUEST_ID = re.compile(r"[a-zA-Z0-9_.:-]{1,512}")
_SCHEMA_LIMIT = 64 * 1024
_LABEL_LIMIT = 128
_MEDIA_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}

_ROLES = {
    chat_pb2.ROLE_SYSTEM: Role.SYSTEM,
    chat_pb2.ROLE_USER: Role.USER,
    chat_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    chat_pb2.ROLE_TOOL: Role.TOOL,
}
_CHOICES = {
    tool_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    tool_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    tool_pb2.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    tool_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    tool_pb2.TOOL_CHOICE_MODE_TOOL: ToolChoiceMode.TOOL,
}
_FORMATS = {
    generation_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED: OutputFormat.TEXT,
    generation_pb2.RESPONSE_FORMAT_TYPE_TEXT: OutputFormat.TEXT,
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: OutputFormat.JSON_OBJECT,
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: OutputFormat.JSON_SCHEMA,
}
_FINISH = {
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.MAX_TOKENS: generation_pb2.FINISH_REASON_MAX_TOKENS,
    FinishReason.STOP_SEQUENCE: generation_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.TOOL_CALLS: generation_pb2.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: generation_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.OTHER: generation_pb2.FINISH_REASON_OTHER,
}
_OUTCOMES = {
    AttemptOutcome.SUCCEEDED: generation_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    AttemptOutcome.RETRIED: generation_pb2.ATTEMPT_OUTCOME_RETRIED,
    AttemptOutcome.FELL_BACK: generation_pb2.ATTEMPT_OUTCOME_FELL_BACK,
    AttemptOutcome.SKIPPED_CIRCUIT_OPEN: generation_pb2.ATTEMPT_OUTCOME_SKIPPED_CIRCUIT_OPEN,
    AttemptOutcome.FAILED: generation_pb2.ATTEMPT_OUTCOME_FAILED,
}
_PROVIDER_KINDS = {
    ProviderKind.ANTHROPIC: provider_pb2.PROVIDER_KIND_ANTHROPIC,
    ProviderKind.OPENAI: provider_pb2.PROVIDER_KIND_OPENAI,
    ProviderKind.OPENAI_COMPATIBLE: provider_pb2.PROVIDER_KIND_OPENAI_COMPATIBLE,
    ProviderKind.LOCAL: provider_pb2.PROVIDER_KIND_LOCAL,
}
_CIRCUITS = {
    CircuitState.CLOSED: provider_pb2.CIRCUIT_STATE_CLOSED,
    CircuitState.OPEN: provider_pb2.CIRCUIT_STATE_OPEN,
    CircuitState.HALF_OPEN: provider_pb2.CIRCUIT_STATE_HALF_OPEN,
}

GenerateLike = llmrouter_service_pb2.GenerateRequest | llmrouter_service_pb2.StreamGenerateRequest


# -- requests ------------------------------------------------------------------------------------


def _schema_problem(schema_text: str) -> tuple[dict[str, Any] | None, str]:
    """(parsed schema, problem) for a JSON Schema object given as text."""
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(schema, dict):
        return None, "not a JSON object"
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return None, f"not a valid JSON Schema (draft 2020-12) at {where}"
    return schema, ""


def _part(
    part: chat_pb2.ContentPart,
    role: Role,
    path: str,
    bad: list[tuple[str, str]],
    seen_calls: set[str],
) -> Part | None:
    kind = part.WhichOneof("part")
    if kind == "text":
        return Text(part.text.text)
    if kind == "tool_call":
        call = part.tool_call
        if role is not Role.ASSISTANT:
            bad.append((path, "tool calls belong in assistant messages"))
        if not call.tool_call_id:
            bad.append((f"{path}.tool_call.tool_call_id", "required"))
        if not _TOOL_NAME.fullmatch(call.tool_name):
            bad.append((f"{path}.tool_call.tool_name", "1-64 characters of [a-zA-Z0-9_-]"))
        arguments = call.arguments_json or "{}"
        try:
            if not isinstance(json.loads(arguments), dict):
                bad.append((f"{path}.tool_call.arguments_json", "not a JSON object"))
        except ValueError:
            bad.append((f"{path}.tool_call.arguments_json", "not valid JSON"))
        seen_calls.add(call.tool_call_id)
        return ToolCall(call.tool_call_id, call.tool_name, arguments)
    if kind == "tool_result":
        result = part.tool_result
        if role is not Role.TOOL:
            bad.append((path, "tool results belong in tool messages"))
        if not result.tool_call_id:
            bad.append((f"{path}.tool_result.tool_call_id", "required"))
        elif result.tool_call_id not in seen_calls:
            bad.append((f"{path}.tool_result.tool_call_id", "no earlier tool call has this id"))
        return ToolResult(result.tool_call_id, result.content, result.is_error)
    if kind == "image":
        image = part.image
        source = image.WhichOneof("source")
        if source is None:
            bad.append((f"{path}.image", "data or url is required"))
        if source == "data" and image.media_type not in _MEDIA_TYPES:
            bad.append((f"{path}.image.media_type", "one of " + ", ".join(sorted(_MEDIA_TYPES))))
        if role is not Role.USER:
            bad.append((path, "images belong in user messages"))
        return Image(image.media_type, image.data, image.url)
    bad.append((path, "content part is empty"))
    return None


def chat_request(request: GenerateLike) -> ChatRequest:
    """Validate a Generate or StreamGenerate request and turn it into a `ChatRequest`."""
    bad: list[tuple[str, str]] = []
    if len(request.model) > 128:
        bad.append(("model", "at most 128 characters"))
    messages: list[Message] = []
    seen_calls: set[str] = set()
    if not request.messages:
        bad.append(("messages", "at least one message is required"))
    for i, message in enumerate(request.messages):
        path = f"messages[{i}]"
        role = _ROLES.get(message.role)
        if role is None:
            bad.append((f"{path}.role", "required" if message.role == 0 else "unknown role"))
            continue
        if not message.parts:
            bad.append((f"{path}.parts", "at least one part is required"))
        parts: list[Part] = []
        for j, part in enumerate(message.parts):
            converted = _part(part, role, f"{path}.parts[{j}]", bad, seen_calls)
            if converted is not None:
                parts.append(converted)
        messages.append(Message(role, tuple(parts), message.name))

    sampling_pb = request.sampling
    sampling = Sampling(
        temperature=sampling_pb.temperature if sampling_pb.HasField("temperature") else None,
        top_p=sampling_pb.top_p if sampling_pb.HasField("top_p") else None,
        top_k=sampling_pb.top_k if sampling_pb.HasField("top_k") else None,
        max_output_tokens=sampling_pb.max_output_tokens,
        stop_sequences=tuple(sampling_pb.stop_sequences),
        seed=sampling_pb.seed if sampling_pb.HasField("seed") else None,
    )
    if sampling.temperature is not None and not 0 <= sampling.temperature <= 2:
        bad.append(("sampling.temperature", "between 0 and 2"))
    if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
        bad.append(("sampling.top_p", "greater than 0 and at most 1"))
    if sampling.top_k is not None and not 1 <= sampling.top_k <= 1000:
        bad.append(("sampling.top_k", "between 1 and 1000"))
    if sampling.max_output_tokens < 0:
        bad.append(("sampling.max_output_tokens", "at least 0"))
    if len(sampling.stop_sequences) > 4:
        bad.append(("sampling.stop_sequences", "at most 4"))
    for k, stop in enumerate(sampling.stop_sequences):
        if not 1 <= len(stop) <= 128:
            bad.append((f"sampling.stop_sequences[{k}]", "1-128 characters"))

    metadata = request.metadata
    for name in ("run_id", "step_id", "agent_name"):
        if len(getattr(metadata, name)) > _LABEL_LIMIT:
            bad.append((f"metadata.{name}", f"at most {_LABEL_LIMIT} characters"))
    if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
        bad.append(("request_id", "1-512 characters of [a-zA-Z0-9_.:-]"))
    for k, name in enumerate(request.fallback_models):
        if not name:
            bad.append((f"fallback_models[{k}]", "empty model name"))

    fmt_pb = request.response_format
    fmt_kind = _FORMATS.get(fmt_pb.type)
    if fmt_kind is None:
        bad.append(("response_format.type", "unknown response format type"))
        fmt_kind = OutputFormat.TEXT
    schema_name = fmt_pb.schema_name or "response"
    if not _SCHEMA_NAME.fullmatch(schema_name):
        bad.append(("response_format.schema_name", "1-64 characters of [a-zA-Z0-9_-]"))

    choice_mode = _CHOICES.get(request.tool_choice.mode)
    if choice_mode is None:
        bad.append(("tool_choice.mode", "unknown tool choice mode"))
        choice_mode = ToolChoiceMode.AUTO
    if choice_mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.TOOL) and not request.tools:
        bad.append(("tool_choice", "requires tools"))
    if bad:
        raise invalid_request(bad)

    schema: dict[str, Any] | None = None
    if fmt_kind is OutputFormat.JSON_SCHEMA:
        if len(fmt_pb.json_schema) > _SCHEMA_LIMIT:
            raise RouterError(
                "REQUEST_TOO_LARGE",
                "field over its size limit",
                metadata={
                    "field": "response_format.json_schema",
                    "limit": str(_SCHEMA_LIMIT),
                    "actual": str(len(fmt_pb.json_schema)),
                },
                field_violations=[
                    ("response_format.json_schema", f"at most {_SCHEMA_LIMIT} bytes")
                ],
            )
        schema, problem = _schema_problem(fmt_pb.json_schema or "")
        if not fmt_pb.json_schema:
            problem = "required for RESPONSE_FORMAT_TYPE_JSON_SCHEMA"
        if problem:
            raise RouterError(
                "RESPONSE_SCHEMA_INVALID",
                "the response format's JSON Schema is invalid",
                metadata={"schemaName": schema_name},
                field_violations=[("response_format.json_schema", problem)],
            )

    tools: list[ToolSpec] = []
    tool_bad: list[tuple[str, str]] = []
    first_bad_tool = ""
    names: set[str] = set()
    for k, tool in enumerate(request.tools):
        path = f"tools[{k}]"
        problem_here = False
        if not _TOOL_NAME.fullmatch(tool.name):
            tool_bad.append((f"{path}.name", "1-64 characters of [a-zA-Z0-9_-]"))
            problem_here = True
        elif tool.name in names:
            tool_bad.append((f"{path}.name", "two tools share this name"))
            problem_here = True
        names.add(tool.name)
        parameters, problem = _schema_problem(tool.parameters_json_schema or '{"type":"object"}')
        if parameters is not None and parameters.get("type") != "object":
            parameters, problem = None, 'top-level "type" must be "object"'
        if problem:
            tool_bad.append((f"{path}.parameters_json_schema", problem))
            problem_here = True
        if problem_here and not first_bad_tool:
            first_bad_tool = tool.name
        tools.append(ToolSpec(tool.name, tool.description, parameters or {}))
    if choice_mode is ToolChoiceMode.TOOL and request.tool_choice.tool_name not in names:
        tool_bad.append(("tool_choice.tool_name", "names no tool in tools"))
        first_bad_tool = first_bad_tool or request.tool_choice.tool_name
    if tool_bad:
        raise RouterError(
            "INVALID_TOOL_SCHEMA",
            "a tool definition is invalid",
            metadata={"toolName": first_bad_tool},
            field_violations=tool_bad,
        )

    return ChatRequest(
        model=request.model,
        messages=tuple(messages),
        system_prompt=request.system_prompt,
        tools=tuple(tools),
        tool_choice=ToolChoice(choice_mode, request.tool_choice.tool_name),
        sampling=sampling,
        response_format=ResponseFormat(fmt_kind, schema, schema_name),
        fallback_models=tuple(request.fallback_models),
        disable_fallback=request.disable_fallback,
        cache_prompt=request.cache_prompt,
        parallel_tool_calls=not request.disable_parallel_tool_calls,
    )


# -- responses -----------------------------------------------------------------------------------


def duration(seconds: float | None) -> duration_pb2.Duration | None:
    """A Duration, or None for None."""
    if seconds is None:
        return None
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


def timestamp(epoch: float | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp from epoch seconds, or None."""
    if epoch is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(epoch * 1e9))
    return value


def usage(value: Usage) -> usage_pb2.Usage:
    """Usage as the common proto."""
    return usage_pb2.Usage(
        input_tokens=value.input_tokens,
        output_tokens=value.output_tokens,
        cache_read_input_tokens=value.cache_read_input_tokens,
        cache_creation_input_tokens=value.cache_creation_input_tokens,
        cost_usd_micros=value.cost_usd_micros,
    )


def _reason_enum(reason: str) -> int:
    from foredeck.llmrouter.v1 import error_reason_pb2

    try:
        return int(error_reason_pb2.ErrorReason.Value("ERROR_REASON_" + reason))
    except ValueError:
        return 0


def attempt(value: Attempt) -> generation_pb2.GenerationAttempt:
    """One attempt as the proto."""
    return generation_pb2.GenerationAttempt(
        provider=value.provider,
        model=value.model,
        outcome=_OUTCOMES[value.outcome],
        error_reason=_reason_enum(value.error_reason) if value.error_reason else 0,  # type: ignore[arg-type]
        upstream_status=value.upstream_status,
        duration=duration(value.seconds),
        retry_after=duration(value.retry_after),
    )


def assistant_message(parts: list[Text | ToolCall]) -> chat_pb2.ChatMessage:
    """The assistant message built from text and tool call parts."""
    out = chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT)
    for part in parts:
        if isinstance(part, Text):
            out.parts.append(chat_pb2.ContentPart(text=chat_pb2.TextPart(text=part.text)))
        else:
            out.parts.append(
                chat_pb2.ContentPart(
                    tool_call=tool_pb2.ToolCall(
                        tool_call_id=part.call_id,
                        tool_name=part.name,
                        arguments_json=part.arguments_json,
                    )
                )
            )
    return out


def generate_response(value: Generation) -> llmrouter_service_pb2.GenerateResponse:
    """A finished generation as the Generate response."""
    completion = value.completion
    return llmrouter_service_pb2.GenerateResponse(
        message=assistant_message(completion.parts),
        finish_reason=_FINISH[completion.finish_reason],
        matched_stop_sequence=completion.matched_stop_sequence,
        usage=usage(completion.usage),
        provider=value.provider,
        model=value.model,
        requested_model=value.requested_model,
        attempts=[attempt(a) for a in value.attempts],
        generation_id=value.generation_id,
        provider_response_id=completion.provider_response_id,
    )


def error_message(error: RouterError, code: int) -> error_pb2.Error:
    """A router error as the common Error message carried inside a stream."""
    return error_pb2.Error(
        code=code,
        reason=error.reason,
        domain=DOMAIN,
        message=error.message,
        metadata=dict(error.metadata),
        retry_delay=duration(error.retry_after),
    )


def stream_response(item: StreamItem, code_of: Any) -> llmrouter_service_pb2.StreamGenerateResponse:
    """One stream item as a StreamGenerate response event."""
    Response = llmrouter_service_pb2.StreamGenerateResponse
    if isinstance(item, TextOut):
        return Response(
            text_delta=generation_pb2.TextDelta(part_index=item.part_index, text=item.text)
        )
    if isinstance(item, ToolArgsOut):
        return Response(
            tool_call_arguments_delta=generation_pb2.ToolCallArgumentsDelta(
                part_index=item.part_index,
                tool_call_id=item.call_id,
                arguments_json_fragment=item.fragment,
            )
        )
    if isinstance(item, ToolStartOut):
        return Response(
            tool_call_started=generation_pb2.ToolCallStarted(
                part_index=item.part_index, tool_call_id=item.call_id, tool_name=item.name
            )
        )
    if isinstance(item, UsageOut):
        return Response(usage=usage(item.usage))
    if isinstance(item, Started):
        return Response(
            started=generation_pb2.GenerationStarted(
                generation_id=item.generation_id,
                requested_model=item.requested_model,
                provider=item.provider,
                model=item.model,
                provider_response_id=item.provider_response_id,
                prior_attempts=[attempt(a) for a in item.prior_attempts],
            )
        )
    if isinstance(item, Finished):
        return Response(
            finished=generation_pb2.GenerationFinished(
                finish_reason=_FINISH[item.finish_reason],
                matched_stop_sequence=item.matched_stop_sequence,
                usage=usage(item.usage),
                attempts=[attempt(a) for a in item.attempts],
            )
        )
    assert isinstance(item, Failed)
    return Response(
        failed=generation_pb2.GenerationFailed(
            error=error_message(item.error, code_of(item.error.reason)),
            partial_message=assistant_message(item.partial_parts),
            incomplete_tool_call_ids=item.incomplete_tool_call_ids,
            usage=usage(item.usage),
            attempts=[attempt(a) for a in item.attempts],
        )
    )


def model_message(catalog: Catalog, model: ModelSpec, circuit: CircuitState) -> model_pb2.Model:
    """A configured model as the proto."""
    caps = model.capabilities
    price = model.pricing
    return model_pb2.Model(
        name=model.name,
        aliases=catalog.aliases_of(model.name),
        provider=model.provider,
        provider_kind=_PROVIDER_KINDS[catalog.providers[model.provider].kind],
        provider_model=model.provider_model,
        kind=model_pb2.MODEL_KIND_CHAT
        if model.kind is ModelKind.CHAT
        else model_pb2.MODEL_KIND_EMBEDDING,
        context_window_tokens=model.context_window_tokens,
        max_output_tokens=model.max_output_tokens,
        capabilities=model_pb2.ModelCapabilities(
            tools=caps.tools,
            streaming=caps.streaming,
            vision=caps.vision,
            json_schema=caps.json_schema,
            json_object=caps.json_object,
            prompt_caching=caps.prompt_caching,
            parallel_tool_calls=caps.parallel_tool_calls,
            embedding_dimensions=caps.embedding_dimensions,
        ),
        pricing=model_pb2.ModelPricing(
            input_usd_micros_per_million_tokens=price.input,
            output_usd_micros_per_million_tokens=price.output,
            cache_read_usd_micros_per_million_tokens=price.cache_read,
            cache_write_usd_micros_per_million_tokens=price.cache_write,
        ),
        fallback_models=list(model.fallback_models),
        circuit_state=_CIRCUITS[circuit],
        embedding_dimensions=model.embedding_dimensions,
        is_default=catalog.is_default(model.name),
    )


def provider_kind(kind: ProviderKind) -> int:
    """The proto ProviderKind value."""
    return int(_PROVIDER_KINDS[kind])


def circuit_state(state: CircuitState) -> int:
    """The proto CircuitState value."""
    return int(_CIRCUITS[state])


def circuit_message(
    snapshot: CircuitSnapshot, threshold: int, window: float
) -> provider_pb2.Circuit:
    """One circuit as the proto."""
    return provider_pb2.Circuit(
        provider=snapshot.provider,
        model=snapshot.model,
        state=_CIRCUITS[snapshot.state],
        recent_failure_count=snapshot.recent_failures,
        failure_threshold=threshold,
        failure_window=duration(window),
        open_time=timestamp(snapshot.opened_at),
        next_probe_time=timestamp(snapshot.next_probe_at),
        last_failure_reason=_reason_enum(snapshot.last_failure_reason),  # type: ignore[arg-type]
        last_failure_time=timestamp(snapshot.last_failure_at),
        last_success_time=timestamp(snapshot.last_success_at),
    )
