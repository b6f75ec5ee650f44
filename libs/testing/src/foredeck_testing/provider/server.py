"""The scripted provider: an aiohttp server that answers like Anthropic and OpenAI.

No LLM API is reachable from tests, so the real `anthropic` and `openai` SDKs are pointed at this
server instead. It answers each request with the next matching scripted step, rendered in the
wire format of the endpoint that was called, and records every request it receives.
"""

from __future__ import annotations

import asyncio
import http
import json
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, Self

from aiohttp import web
from aiohttp.typedefs import Handler

from foredeck_testing.provider import anthropic_format, openai_format
from foredeck_testing.provider._common import SseEvent
from foredeck_testing.provider.script import (
    QueuedStep,
    Script,
    ScriptError,
    parse_script,
    step_to_dict,
)
from foredeck_testing.provider.steps import (
    ConnectionReset,
    Delay,
    Endpoint,
    Hang,
    HttpError,
    MidStreamFailure,
    Reply,
    Step,
    TextReply,
    ToolCallsReply,
)

DEFAULT_MODELS: tuple[str, ...] = (
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
    "gpt-4o",
    "gpt-4o-mini",
    "text-embedding-3-small",
)
DEFAULT_REPLY = TextReply("Hello from the scripted provider.")
CONTROL_PREFIX = "/_scripted"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it, and the step that answered it.

    `headers` has lower-case names. `body` is the parsed JSON body (None when there was none,
    the raw text when it was not JSON). `step` is None when the request was refused before a
    step was taken (bad API key, malformed body) or when a non-generating endpoint answered
    normally.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    endpoint: Endpoint | None
    step: Step | None

    @property
    def model(self) -> str | None:
        """The `model` field of the body, if any."""
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else None

    @property
    def stream(self) -> bool:
        """Whether the request asked for a streamed answer."""
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def retry_count(self) -> int:
        """How many times the SDK had retried before this attempt (`x-stainless-retry-count`)."""
        value = self.headers.get("x-stainless-retry-count", "0")
        return int(value) if value.isdigit() else 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form served by the control endpoint."""
        return {
            "method": self.method,
            "path": self.path,
            "headers": dict(self.headers),
            "body": self.body,
            "endpoint": self.endpoint.value if self.endpoint is not None else None,
            "step": step_to_dict(self.step) if self.step is not None else None,
        }


@dataclass(frozen=True)
class _Wire:
    """The functions that render steps in one provider's wire format."""

    request_id_header: str
    new_request_id: Callable[[], str]
    error_body: Callable[[HttpError, str], dict[str, Any]]
    stream_error: Callable[[HttpError, str], SseEvent]
    reply_body: Callable[[Reply, str], dict[str, Any]]
    stream_events: Callable[[Reply, str, Mapping[str, Any]], list[SseEvent]]


_ANTHROPIC = _Wire(
    request_id_header=anthropic_format.REQUEST_ID_HEADER,
    new_request_id=anthropic_format.new_request_id,
    error_body=anthropic_format.error_body,
    stream_error=anthropic_format.stream_error,
    reply_body=anthropic_format.reply_body,
    stream_events=lambda reply, model, _request: anthropic_format.stream_events(reply, model),
)
_OPENAI = _Wire(
    request_id_header=openai_format.REQUEST_ID_HEADER,
    new_request_id=openai_format.new_request_id,
    error_body=openai_format.error_body,
    stream_error=openai_format.stream_error,
    reply_body=openai_format.reply_body,
    stream_events=openai_format.stream_events,
)

_REQUIRED_FIELDS: dict[Endpoint, tuple[tuple[str, type[Any]], ...]] = {
    Endpoint.ANTHROPIC_MESSAGES: (("model", str), ("max_tokens", int), ("messages", list)),
    Endpoint.ANTHROPIC_COUNT_TOKENS: (("model", str), ("messages", list)),
    Endpoint.OPENAI_CHAT_COMPLETIONS: (("model", str), ("messages", list)),
    Endpoint.OPENAI_EMBEDDINGS: (("model", str), ("input", object)),
}


class ScriptedProvider:
    """An HTTP server on 127.0.0.1 that speaks the Anthropic and OpenAI wire formats.

    Use it as an async context manager inside the test's event loop; point
    `anthropic.AsyncAnthropic(base_url=server.anthropic_base_url)` or
    `openai.AsyncOpenAI(base_url=server.openai_base_url)` at it, queue steps with `enqueue`,
    and read what the SDK sent from `requests`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Step = DEFAULT_REPLY,
        api_key: str | None = None,
        embedding_dimensions: int = 16,
        models: Sequence[str] = DEFAULT_MODELS,
        record_requests: bool = True,
        script: Script | None = None,
    ) -> None:
        if embedding_dimensions < 1:
            raise ValueError("embedding_dimensions must be positive")
        self._host = host
        self._requested_port = port
        self.default = (
            script.default if script is not None and script.default is not None else default
        )
        self.api_key = api_key
        self.embedding_dimensions = embedding_dimensions
        self.models: tuple[str, ...] = tuple(models)
        self._record_requests = record_requests
        self._queue: list[QueuedStep] = list(script.steps) if script is not None else []
        self._requests: list[RecordedRequest] = []
        self._request_count = 0
        self._in_flight = 0
        self._changed: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # Lifecycle

    async def start(self) -> None:
        """Bind the port and start serving."""
        if self._runner is not None:
            raise RuntimeError("the scripted provider is already running")
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        app = web.Application(middlewares=[self._track], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._anthropic_messages)
        app.router.add_post("/v1/messages/count_tokens", self._anthropic_count_tokens)
        app.router.add_post("/v1/chat/completions", self._openai_chat_completions)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post(f"{CONTROL_PREFIX}/steps", self._control_steps)
        app.router.add_get(f"{CONTROL_PREFIX}/requests", self._control_requests)
        app.router.add_post(f"{CONTROL_PREFIX}/reset", self._control_reset)
        # handler_cancellation: a client that disconnects cancels its handler, which ends any
        # delay or hang at once instead of leaving it to run out.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        """Stop serving; requests still held (hang, delay, slow stream) lose their connection."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        assert self._closing is not None
        self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # Addresses

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._port is None:
            raise RuntimeError("the scripted provider is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """`http://host:port`, with no path."""
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def anthropic_base_url(self) -> str:
        """The base URL for `anthropic.AsyncAnthropic`, which adds `/v1/...` itself."""
        return self.base_url

    @property
    def openai_base_url(self) -> str:
        """The base URL for `openai.AsyncOpenAI`, which expects it to end in `/v1`."""
        return f"{self.base_url}/v1"

    # Script

    @property
    def default(self) -> Step:
        """The step that answers a generating request when no queued step matches it."""
        return self._default

    @default.setter
    def default(self, step: Step) -> None:
        if isinstance(step, Delay) and step.then is None:
            raise ValueError("the default step cannot be a Delay that defers to the default")
        self._default = step

    def enqueue(
        self, *steps: Step, endpoint: Endpoint | None = None, model: str | None = None
    ) -> None:
        """Queue steps, first in first out, for requests to `endpoint` and `model`.

        `None` matches any endpoint that generates output (messages, chat completions) and any
        model. Each request takes the oldest queued step that matches it.
        """
        self._queue.extend(QueuedStep(step, endpoint, model) for step in steps)

    @property
    def pending(self) -> int:
        """How many queued steps no request has taken yet."""
        return len(self._queue)

    def reset(self) -> None:
        """Drop the queued steps and the recorded requests."""
        self._queue.clear()
        self._requests.clear()
        self._request_count = 0

    def _take(self, endpoint: Endpoint, model: str | None) -> Step | None:
        for index, queued in enumerate(self._queue):
            if queued.matches(endpoint, model):
                del self._queue[index]
                return queued.step
        return self.default if endpoint.generates else None

    # Recorded requests

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (control requests excluded)."""
        return list(self._requests)

    def requests_to(self, endpoint: Endpoint) -> list[RecordedRequest]:
        """The recorded requests to one endpoint."""
        return [request for request in self._requests if request.endpoint == endpoint]

    @property
    def request_count(self) -> int:
        """How many requests arrived, counted even when recording is off."""
        return self._request_count

    @property
    def in_flight(self) -> int:
        """How many requests are being answered right now."""
        return self._in_flight

    # These waits take their own timeout so that a failed wait says what was missing, which a
    # caller's asyncio.timeout could not report.
    async def wait_for_requests(
        self,
        count: int,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[RecordedRequest]:
        """Wait until at least `count` requests were received; TimeoutError after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._wait_until(lambda: self._request_count >= count)
        except TimeoutError:
            message = f"expected {count} requests, received {self._request_count}"
            raise TimeoutError(message) from None
        return self.requests

    async def wait_idle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until no request is in flight, e.g. after a client gave up on a slow answer."""
        try:
            async with asyncio.timeout(timeout):
                await self._wait_until(lambda: self._in_flight == 0)
        except TimeoutError:
            raise TimeoutError(f"{self._in_flight} requests still in flight") from None

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            assert self._changed is not None, "the scripted provider is not running"
            await self._changed.wait()

    def _notify(self) -> None:
        # One event per generation: waiters hold the old one, which is set exactly once.
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _record(
        self, request: web.Request, endpoint: Endpoint, body: Any, step: Step | None
    ) -> None:
        self._request_count += 1
        if self._record_requests:
            self._requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    headers={name.lower(): value for name, value in request.headers.items()},
                    body=body,
                    endpoint=endpoint,
                    step=step,
                )
            )
        self._notify()

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await handler(request)
        self._in_flight += 1
        try:
            return await handler(request)
        finally:
            self._in_flight -= 1
            self._notify()

    # Endpoints

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Endpoint.ANTHROPIC_MESSAGES, _ANTHROPIC, None)

    async def _anthropic_count_tokens(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(
            request, Endpoint.ANTHROPIC_COUNT_TOKENS, _ANTHROPIC, anthropic_format.count_tokens_body
        )

    async def _openai_chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Endpoint.OPENAI_CHAT_COMPLETIONS, _OPENAI, None)

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(
            request,
            Endpoint.OPENAI_EMBEDDINGS,
            _OPENAI,
            lambda body: openai_format.embeddings_body(body, self.embedding_dimensions),
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        # Both APIs list models at GET /v1/models; only Anthropic's SDK sends anthropic-version.
        if "anthropic-version" in request.headers:
            return await self._serve(
                request,
                Endpoint.ANTHROPIC_MODELS,
                _ANTHROPIC,
                lambda _body: anthropic_format.models_body(self.models),
            )
        return await self._serve(
            request,
            Endpoint.OPENAI_MODELS,
            _OPENAI,
            lambda _body: openai_format.models_body(self.models),
        )

    async def _serve(
        self,
        request: web.Request,
        endpoint: Endpoint,
        wire: _Wire,
        answer: Callable[[Mapping[str, Any]], dict[str, Any]] | None,
    ) -> web.StreamResponse:
        """Answer one API request: check it, take its step, record it, carry the step out.

        `answer` renders the normal answer of a non-generating endpoint; generating endpoints
        (None) render the reply step instead.
        """
        body, problem = await _read_body(request, endpoint)
        authorized = self._authorized(request, endpoint)
        model = body.get("model") if isinstance(body, dict) else None
        step = None
        if authorized and problem is None:
            step = self._take(endpoint, model if isinstance(model, str) else None)
        self._record(request, endpoint, body, step)
        if not authorized:
            return self._error_response(wire, _unauthorized(endpoint))
        if problem is not None:
            return self._error_response(wire, HttpError(400, message=problem))
        payload: dict[str, Any] = body if isinstance(body, dict) else {}
        while isinstance(step, Delay):
            await self._pause(request, step.seconds)
            step = step.then if step.then is not None else self.default
        match step:
            case ConnectionReset():
                _drop_connection(request, reset=True)
            case Hang():
                await self._hold(request)
            case HttpError():
                return self._error_response(wire, step)
            case _ if answer is not None:
                # A non-generating endpoint answers normally to any other step.
                try:
                    return _json_response(wire, answer(payload))
                except ValueError as error:
                    return self._error_response(wire, HttpError(400, message=str(error)))
            case None:
                raise AssertionError("unreachable: generating endpoints always take a step")
            case MidStreamFailure():
                if payload.get("stream") is True:
                    return await self._stream(request, wire, step.reply, payload, step)
                return await self._fail_unstreamed(request, wire, step, str(payload["model"]))
            case TextReply() | ToolCallsReply():
                if payload.get("stream") is True:
                    return await self._stream(request, wire, step, payload, None)
                return _json_response(wire, wire.reply_body(step, str(payload["model"])))

    def _authorized(self, request: web.Request, endpoint: Endpoint) -> bool:
        if self.api_key is None:
            return True
        if request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        is_anthropic = endpoint.value.startswith("anthropic.")
        return is_anthropic and request.headers.get("x-api-key") == self.api_key

    def _error_response(self, wire: _Wire, error: HttpError) -> web.Response:
        request_id = wire.new_request_id()
        headers = {wire.request_id_header: request_id}
        if error.retry_after is not None:
            headers["retry-after"] = _seconds(error.retry_after)
        if error.retry_after_ms is not None:
            headers["retry-after-ms"] = _seconds(error.retry_after_ms)
        if error.should_retry is not None:
            headers["x-should-retry"] = "true" if error.should_retry else "false"
        headers.update(error.headers)
        return web.json_response(
            wire.error_body(error, request_id),
            status=error.status,
            reason=_reason(error.status),
            headers=headers,
        )

    async def _stream(
        self,
        request: web.Request,
        wire: _Wire,
        reply: Reply,
        body: Mapping[str, Any],
        failure: MidStreamFailure | None,
    ) -> web.StreamResponse:
        events = wire.stream_events(reply, str(body["model"]), body)
        request_id = wire.new_request_id()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                wire.request_id_header: request_id,
            }
        )
        await response.prepare(request)
        sent = 0
        for event in events:
            if failure is not None and event.phase != "frame" and sent >= failure.after_deltas:
                if failure.mode == "error":
                    await response.write(wire.stream_error(failure.error, request_id).encode())
                    await response.write_eof()
                    return response
                if failure.mode == "hang":
                    await self._hold(request)
                _drop_connection(request, reset=False)
            if event.phase == "delta":
                if reply.delta_interval > 0:
                    await self._pause(request, reply.delta_interval)
                sent += 1
            await response.write(event.encode())
        await response.write_eof()
        return response

    async def _fail_unstreamed(
        self, request: web.Request, wire: _Wire, failure: MidStreamFailure, model: str
    ) -> web.StreamResponse:
        """A mid-stream failure met by a request that did not stream."""
        if failure.mode == "error":
            return self._error_response(wire, failure.error)
        if failure.mode == "hang":
            await self._hold(request)
        payload = json.dumps(wire.reply_body(failure.reply, model)).encode()
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/json",
                wire.request_id_header: wire.new_request_id(),
            }
        )
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        _drop_connection(request, reset=False)

    async def _pause(self, request: web.Request, seconds: float) -> None:
        """Wait `seconds`; a closing server drops the connection instead.

        A client that disconnects cancels the handler, which ends the wait with it.
        """
        assert self._closing is not None
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return
        _drop_connection(request, reset=False)

    async def _hold(self, request: web.Request) -> NoReturn:
        """Answer nothing until the client disconnects or the server closes."""
        assert self._closing is not None
        await self._closing.wait()
        _drop_connection(request, reset=False)

    # Control endpoints, for a server running in another process

    async def _control_steps(self, request: web.Request) -> web.Response:
        try:
            script = parse_script(await request.json())
        except (ValueError, ScriptError) as error:
            return web.json_response({"error": str(error)}, status=400)
        if script.default is not None:
            self.default = script.default
        self._queue.extend(script.steps)
        return web.json_response({"pending": self.pending})

    async def _control_requests(self, request: web.Request) -> web.Response:
        del request
        return web.json_response({"requests": [r.to_dict() for r in self._requests]})

    async def _control_reset(self, request: web.Request) -> web.Response:
        del request
        self.reset()
        return web.json_response({"pending": 0})


async def _read_body(request: web.Request, endpoint: Endpoint) -> tuple[Any, str | None]:
    """The parsed body and what is wrong with it, if anything, in the provider's words."""
    raw = await request.read()
    if not raw:
        body: Any = None
    else:
        try:
            body = json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace"), "The request body is not valid JSON."
    required = _REQUIRED_FIELDS.get(endpoint)
    if required is None:
        return body, None
    if not isinstance(body, dict):
        return body, "The request body must be a JSON object."
    for name, kind in required:
        value = body.get(name)
        if value is None:
            return body, f"{name}: Field required"
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            return body, f"{name}: Input should be a valid {kind.__name__}"
    return body, None


def _unauthorized(endpoint: Endpoint) -> HttpError:
    if endpoint.value.startswith("anthropic."):
        return HttpError(401, message="invalid x-api-key")
    return HttpError(401, message="Incorrect API key provided.", code="invalid_api_key")


def _json_response(wire: _Wire, body: Any) -> web.Response:
    return web.json_response(body, headers={wire.request_id_header: wire.new_request_id()})


def _reason(status: int) -> str | None:
    """A reason phrase for statuses the standard library does not know, such as 529."""
    try:
        http.HTTPStatus(status)
    except ValueError:
        return "Overloaded" if status == 529 else "Error"
    return None


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _drop_connection(request: web.Request, *, reset: bool) -> NoReturn:
    """Close the client's connection mid-request: a TCP reset, or a plain close (FIN).

    The handler then ends as cancelled, which aiohttp treats as a client that went away, so it
    writes nothing more to the dead connection.
    """
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0 turns close() into an RST, which clients see as ECONNRESET.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    raise asyncio.CancelledError
