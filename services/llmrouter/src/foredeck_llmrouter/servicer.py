"""The gRPC face of the router: permissions, proto to domain and back, errors to statuses."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
from redis.exceptions import RedisError

from foredeck.llmrouter.v1 import (
    llmrouter_service_pb2 as pb,
)
from foredeck.llmrouter.v1 import (
    llmrouter_service_pb2_grpc,
    model_pb2,
    provider_pb2,
)
from foredeck_kit.errors import ServiceError
from foredeck_kit.principal import Principal, current_principal
from foredeck_llmrouter import wire
from foredeck_llmrouter.adapters.recorder import ClaimState, RedisResponseRecorder
from foredeck_llmrouter.domain.catalog import ModelKind
from foredeck_llmrouter.domain.errors import RouterError, invalid_request
from foredeck_llmrouter.domain.model import ChatRequest
from foredeck_llmrouter.domain.ports import CircuitState
from foredeck_llmrouter.domain.router import Router

SERVICE_NAME = "foredeck.llmrouter.v1.LlmRouterService"

_CODES: dict[str, grpc.StatusCode] = {
    "INVALID_REQUEST": grpc.StatusCode.INVALID_ARGUMENT,
    "REQUEST_TOO_LARGE": grpc.StatusCode.INVALID_ARGUMENT,
    "DEADLINE_TOO_SHORT": grpc.StatusCode.DEADLINE_EXCEEDED,
    "STORE_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "SHUTTING_DOWN": grpc.StatusCode.UNAVAILABLE,
    "PAGE_TOKEN_INVALID": grpc.StatusCode.INVALID_ARGUMENT,
    "MODEL_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "MODEL_CAPABILITY_UNSUPPORTED": grpc.StatusCode.INVALID_ARGUMENT,
    "PROVIDER_AUTH_FAILED": grpc.StatusCode.FAILED_PRECONDITION,
    "PROVIDER_RATE_LIMITED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "PROVIDER_QUOTA_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "PROVIDER_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "PROVIDER_TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED,
    "PROVIDER_REJECTED_REQUEST": grpc.StatusCode.INVALID_ARGUMENT,
    "CONTEXT_WINDOW_EXCEEDED": grpc.StatusCode.INVALID_ARGUMENT,
    "CIRCUIT_OPEN": grpc.StatusCode.UNAVAILABLE,
    "ALL_PROVIDERS_FAILED": grpc.StatusCode.UNAVAILABLE,
    "STREAM_INTERRUPTED": grpc.StatusCode.UNAVAILABLE,
    "INVALID_TOOL_SCHEMA": grpc.StatusCode.INVALID_ARGUMENT,
    "STRUCTURED_OUTPUT_INVALID": grpc.StatusCode.FAILED_PRECONDITION,
    "CONTENT_FILTERED": grpc.StatusCode.INVALID_ARGUMENT,
    "RESPONSE_SCHEMA_INVALID": grpc.StatusCode.INVALID_ARGUMENT,
    "PROVIDER_MODEL_NOT_FOUND": grpc.StatusCode.FAILED_PRECONDITION,
    "PROVIDER_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "PROVIDER_RESPONSE_INVALID": grpc.StatusCode.UNAVAILABLE,
    "DELEGATION_NOT_ALLOWED": grpc.StatusCode.PERMISSION_DENIED,
}

_PENDING_POLL_SECONDS = 0.05
_MAX_TEXTS = 2048
_MAX_TEXT_BYTES = 256 * 1024
_CHARS_PER_TOKEN = 3
"""Estimates err high: three characters a token is more tokens than real text gives."""


def code_of(reason: str) -> grpc.StatusCode:
    """The status code a reason travels with."""
    return _CODES.get(reason, grpc.StatusCode.INTERNAL)


def to_service_error(error: RouterError) -> ServiceError:
    """A domain error as the kit's typed error."""
    return ServiceError(
        code_of(error.reason),
        error.reason,
        error.message,
        metadata=error.metadata,
        field_violations=error.field_violations,
        retry_after=timedelta(seconds=error.retry_after) if error.retry_after is not None else None,
    )


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _page(token: str, size: int, default: int, maximum: int, query: str) -> tuple[int, int]:
    """(offset, size) from a page token made by `_next_token` for the same query."""
    if size < 0:
        raise invalid_request([("page_size", "must not be negative")])
    size = min(size or default, maximum)
    if not token:
        return 0, size
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        offset, digest = int(data["o"]), str(data["q"])
    except (ValueError, KeyError, TypeError):
        raise RouterError(
            "PAGE_TOKEN_INVALID",
            "page token invalid",
            field_violations=[("page_token", "malformed")],
        ) from None
    if digest != _digest(query) or offset < 0:
        raise RouterError(
            "PAGE_TOKEN_INVALID",
            "page token invalid",
            field_violations=[("page_token", "issued for a different query")],
        )
    return offset, size


def _digest(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def _next_token(offset: int, total: int, query: str) -> str:
    if offset >= total:
        return ""
    raw = json.dumps({"o": offset, "q": _digest(query)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


class LlmRouterServicer(llmrouter_service_pb2_grpc.LlmRouterServiceServicer):
    """Thin translation between the contract and the `Router` use cases."""

    def __init__(
        self,
        router: Router,
        circuit_config: tuple[int, float],
        recorder: RedisResponseRecorder | None = None,
    ) -> None:
        self._router = router
        self._threshold, self._window = circuit_config
        self._recorder = recorder

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        """Generate: the next assistant message, whole."""
        principal = current_principal()
        principal.require("llm:generate")
        principal.require_run(request.metadata.run_id)
        try:
            chat = wire.chat_request(request)
            if request.request_id and self._recorder is not None:
                return await self._recorded(request, chat, principal, _deadline(context))
            generation = await self._router.generate(chat, principal.tenant_id, _deadline(context))
        except RouterError as error:
            raise to_service_error(error) from None
        return wire.generate_response(generation)

    async def _recorded(
        self,
        request: pb.GenerateRequest,
        chat: ChatRequest,
        principal: Principal,
        deadline: float | None,
    ) -> pb.GenerateResponse:
        """Generate once per request id: replay a recorded answer, or wait for a running one."""
        assert self._recorder is not None
        recorder = self._recorder
        unkeyed = pb.GenerateRequest()
        unkeyed.CopyFrom(request)
        unkeyed.ClearField("metadata")
        digest = hashlib.sha256(unkeyed.SerializeToString(deterministic=True)).hexdigest()
        ids = (principal.tenant_id, principal.user_id, request.request_id)
        while True:
            try:
                claim = await recorder.claim(*ids, digest)
            except RedisError:
                raise ServiceError.store_unavailable("redis", timedelta(seconds=1)) from None
            if claim.digest != digest:
                raise ServiceError.request_id_reused(request.request_id)
            if claim.state is ClaimState.DONE:
                replay = pb.GenerateResponse.FromString(claim.payload)
                replay.replayed = True
                return replay
            if claim.state is ClaimState.CLAIMED:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise RouterError(
                    "PROVIDER_TIMEOUT", "the first call with this id is still running"
                )
            # The first call with this id is still generating; its answer is polled for.
            await asyncio.sleep(_PENDING_POLL_SECONDS)
        try:
            generation = await self._router.generate(chat, principal.tenant_id, deadline)
        except BaseException:
            with contextlib.suppress(RedisError):
                await asyncio.shield(recorder.release(*ids, digest))
            raise
        response = wire.generate_response(generation)
        try:
            await recorder.finish(*ids, digest, response.SerializeToString())
        except RedisError:
            raise ServiceError.store_unavailable("redis", timedelta(seconds=1)) from None
        return response

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        """StreamGenerate: the next assistant message as typed deltas."""
        principal = current_principal()
        principal.require("llm:generate")
        principal.require_run(request.metadata.run_id)
        try:
            chat = wire.chat_request(request)
            events = self._router.stream(chat, principal.tenant_id, _deadline(context))
            first = await anext(events)
        except RouterError as error:
            raise to_service_error(error) from None

        def code(reason: str) -> int:
            return int(code_of(reason).value[0])

        try:
            yield wire.stream_response(first, code)
            async for item in events:
                yield wire.stream_response(item, code)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedResponse:
        """Embed: vectors for a batch of texts."""
        principal = current_principal()
        principal.require("llm:embed")
        principal.require_run(request.metadata.run_id)
        bad: list[tuple[str, str]] = []
        if not request.texts:
            bad.append(("texts", "at least one text is required"))
        if len(request.texts) > _MAX_TEXTS:
            bad.append(("texts", f"at most {_MAX_TEXTS} texts"))
        for i, text in enumerate(request.texts):
            if not text:
                bad.append((f"texts[{i}]", "empty text"))
            elif len(text.encode()) > _MAX_TEXT_BYTES:
                bad.append((f"texts[{i}]", "at most 256 KiB"))
        if request.dimensions < 0:
            bad.append(("dimensions", "must not be negative"))
        try:
            if bad:
                raise invalid_request(bad)
            model, result, attempts = await self._router.embed(
                request.model, list(request.texts), request.dimensions, _deadline(context)
            )
        except RouterError as error:
            raise to_service_error(error) from None
        dimensions = len(result.vectors[0]) if result.vectors else 0
        return pb.EmbedResponse(
            embeddings=[
                {"index": i, "values": vector}  # type: ignore[misc]
                for i, vector in enumerate(result.vectors)
            ],
            model=model.name,
            provider=model.provider,
            dimensions=dimensions,
            usage=wire.usage(result.usage),
            attempts=[wire.attempt(a) for a in attempts],
        )

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CountTokensResponse:
        """CountTokens: an estimate that errs high, and the worst-case cost."""
        principal = current_principal()
        principal.require("llm:read")
        try:
            chat = wire.chat_request(
                pb.GenerateRequest(
                    model=request.model,
                    messages=request.messages,
                    system_prompt=request.system_prompt,
                    tools=request.tools,
                )
            )
            model = self._router.catalog.resolve(request.model, ModelKind.CHAT, principal.tenant_id)
        except RouterError as error:
            raise to_service_error(error) from None
        characters = len(chat.system_prompt) + sum(
            len(str(part)) for message in chat.messages for part in message.parts
        )
        characters += sum(len(json.dumps(t.parameters)) + len(t.description) for t in chat.tools)
        tokens = characters // _CHARS_PER_TOKEN + 4 * (len(chat.messages) + 1)
        output = request.max_output_tokens or model.max_output_tokens
        output = min(output, model.max_output_tokens)
        price = model.pricing
        cost = (tokens * price.input + output * price.output + 999_999) // 1_000_000
        return pb.CountTokensResponse(
            input_tokens=tokens,
            exact=False,
            model=model.name,
            provider=model.provider,
            context_window_tokens=model.context_window_tokens,
            max_output_tokens=output,
            fits_context_window=tokens + output <= model.context_window_tokens,
            max_cost_usd_micros=cost,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        """ListModels: configured models, ordered by name, with their circuit state."""
        current_principal().require("llm:read")
        catalog = self._router.catalog
        query = f"{request.provider}|{request.kind}"
        try:
            if request.kind not in model_pb2.ModelKind.values():
                raise invalid_request([("kind", "unknown model kind")])
            offset, size = _page(request.page_token, request.page_size, 100, 1000, query)
        except RouterError as error:
            raise to_service_error(error) from None
        kind = {
            model_pb2.MODEL_KIND_CHAT: ModelKind.CHAT,
            model_pb2.MODEL_KIND_EMBEDDING: ModelKind.EMBEDDING,
        }.get(request.kind)
        models = sorted(
            (
                m
                for m in catalog.models.values()
                if (not request.provider or m.provider == request.provider)
                and (kind is None or m.kind is kind)
            ),
            key=lambda m: m.name,
        )
        page = models[offset : offset + size]
        out = []
        for model in page:
            snapshot = await self._router.circuit(model.provider, model.name)
            out.append(wire.model_message(catalog, model, snapshot.state))
        return pb.ListModelsResponse(
            models=out, next_page_token=_next_token(offset + size, len(models), query)
        )

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelResponse:
        """GetModel: one model by name or alias."""
        principal = current_principal()
        principal.require("llm:read")
        catalog = self._router.catalog
        try:
            if not request.model:
                raise invalid_request([("model", "required")])
            try:
                model = catalog.resolve(request.model, ModelKind.CHAT, principal.tenant_id)
            except RouterError as error:
                # A capability error means the name is an embedding model's.
                if error.reason != "MODEL_CAPABILITY_UNSUPPORTED":
                    raise
                model = catalog.resolve(request.model, ModelKind.EMBEDDING)
        except RouterError as error:
            if error.reason == "MODEL_NOT_FOUND":
                names = ",".join(
                    n
                    for n in (
                        catalog.known_names(ModelKind.CHAT),
                        catalog.known_names(ModelKind.EMBEDDING),
                    )
                    if n
                )
                error = RouterError(
                    "MODEL_NOT_FOUND",
                    "model not configured",
                    metadata={"model": request.model, "knownModels": names[:2048]},
                )
            raise to_service_error(error) from None
        snapshot = await self._router.circuit(model.provider, model.name)
        return pb.GetModelResponse(model=wire.model_message(catalog, model, snapshot.state))

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListProvidersResponse:
        """ListProviders: configured providers with a circuit summary."""
        current_principal().require("llm:read")
        catalog = self._router.catalog
        try:
            offset, size = _page(request.page_token, request.page_size, 50, 200, "providers")
        except RouterError as error:
            raise to_service_error(error) from None
        providers = sorted(catalog.providers.values(), key=lambda p: p.name)
        out = []
        for provider in providers[offset : offset + size]:
            models = sorted(m.name for m in catalog.models.values() if m.provider == provider.name)
            states = [(await self._router.circuit(provider.name, m)).state for m in models]
            summary = (
                CircuitState.OPEN
                if CircuitState.OPEN in states
                else CircuitState.HALF_OPEN
                if CircuitState.HALF_OPEN in states
                else CircuitState.CLOSED
            )
            out.append(
                provider_pb2.Provider(
                    name=provider.name,
                    kind=wire.provider_kind(provider.kind),  # type: ignore[arg-type]
                    credentials_configured=provider.credentials_configured,
                    models=models,
                    circuit_state=wire.circuit_state(summary),  # type: ignore[arg-type]
                    open_circuit_count=states.count(CircuitState.OPEN),
                )
            )
        return pb.ListProvidersResponse(
            providers=out,
            next_page_token=_next_token(offset + size, len(providers), "providers"),
        )

    async def GetProviderHealth(
        self, request: pb.GetProviderHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetProviderHealthResponse:
        """GetProviderHealth: every circuit of one provider."""
        current_principal().require("llm:read")
        catalog = self._router.catalog
        try:
            if not request.provider:
                raise invalid_request([("provider", "required")])
            provider = catalog.provider(request.provider)
        except RouterError as error:
            raise to_service_error(error) from None
        models = sorted(m.name for m in catalog.models.values() if m.provider == provider.name)
        circuits = [
            wire.circuit_message(
                await self._router.circuit(provider.name, m), self._threshold, self._window
            )
            for m in models
        ]
        return pb.GetProviderHealthResponse(
            health=provider_pb2.ProviderHealth(
                provider=provider.name,
                kind=wire.provider_kind(provider.kind),  # type: ignore[arg-type]
                circuits=circuits,
            )
        )
