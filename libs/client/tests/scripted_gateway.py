"""A scripted gateway for the SDK's and the CLI's tests: real gRPC, answers from a script."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from foredeck.common.v1 import run_event_pb2, run_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

KEY = "fdk_test_key"


def _status(
    code: int, reason: str, message: str, *extra: object
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain="gateway.foredeck.dev", metadata={"runId": "r-1"}
    )
    details = []
    for detail in (info, *extra):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    status = status_pb2.Status(code=code, message=message, details=details)
    grpc_code = next(c for c in grpc.StatusCode if c.value[0] == code)
    return grpc_code, message, (("grpc-status-details-bin", status.SerializeToString()),)


class ScriptedGateway(gw_grpc.GatewayServiceServicer):
    """Answers like the gateway for the calls the SDK tests make; drops every watch stream once."""

    def __init__(self) -> None:
        self.create_requests: list[gw.CreateRunRequest] = []
        self.watch_requests: list[gw.WatchRunRequest] = []
        self.dropped: set[str] = set()

    @staticmethod
    async def _check_key(context: grpc.aio.ServicerContext[object, object]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {KEY}":
            code, message, trailers = _status(
                code_pb2.UNAUTHENTICATED, "API_KEY_INVALID", "invalid credentials"
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)

    async def CreateRun(
        self, request: gw.CreateRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> gw.CreateRunResponse:
        await self._check_key(context)
        self.create_requests.append(request)
        if request.input == "too fast":
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=7))
            quota = error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(subject="key:k1")]
            )
            code, message, trailers = _status(
                code_pb2.RESOURCE_EXHAUSTED, "RATE_LIMITED", "rate limited", retry, quota
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        if request.input == "":
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="input", description="empty")
                ]
            )
            code, message, trailers = _status(
                code_pb2.INVALID_ARGUMENT, "INVALID_REQUEST", "invalid request", bad
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        run = run_pb2.Run(run_id=f"run-{request.request_id}", input=request.input)
        return gw.CreateRunResponse(run=run, created=True)

    async def GetRun(
        self, request: gw.GetRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> gw.GetRunResponse:
        await self._check_key(context)
        if not request.run_id.startswith("run-"):
            code, message, trailers = _status(code_pb2.NOT_FOUND, "RUN_NOT_FOUND", "no such run")
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        run = run_pb2.Run(
            run_id=request.run_id, status=run_pb2.RUN_STATUS_SUCCEEDED, output="17 * 23 = 391"
        )
        run.usage.input_tokens, run.usage.output_tokens = 120, 30
        return gw.GetRunResponse(run=run)

    async def WatchRun(
        self, request: gw.WatchRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[gw.WatchRunResponse]:
        await self._check_key(context)
        self.watch_requests.append(request)
        start = int(request.after_event_id.split("-")[1]) if request.after_event_id else 0
        for index, event in enumerate(script_events(request.run_id)):
            if index < start:
                continue
            if index == 2 and request.run_id not in self.dropped:
                self.dropped.add(request.run_id)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield gw.WatchRunResponse(event=event)


def script_events(run_id: str) -> list[run_event_pb2.RunEvent]:
    """A run that plans, calls the calculator, and streams its answer."""
    events = [run_event_pb2.RunEvent() for _ in range(12)]
    events[0].status_changed.status = run_pb2.RUN_STATUS_RUNNING
    events[1].step_started.CopyFrom(
        run_event_pb2.StepStarted(
            step_id="s1", step_index=1, kind=run_event_pb2.STEP_KIND_PLAN, description="plan"
        )
    )
    events[2].step_finished.CopyFrom(run_event_pb2.StepFinished(step_id="s1", success=True))
    events[3].step_started.CopyFrom(
        run_event_pb2.StepStarted(
            step_id="s2",
            step_index=2,
            kind=run_event_pb2.STEP_KIND_TOOL_CALL,
            description="multiply",
        )
    )
    events[4].tool_call_requested.step_id = "s2"
    events[4].tool_call_requested.tool_call.tool_name = "calculator"
    events[4].tool_call_requested.tool_call.arguments_json = '{"expression": "17 * 23"}'
    events[5].tool_call_finished.step_id = "s2"
    events[5].tool_call_finished.result.content = "391"
    events[6].step_finished.CopyFrom(run_event_pb2.StepFinished(step_id="s2", success=True))
    events[7].step_started.CopyFrom(
        run_event_pb2.StepStarted(
            step_id="s3",
            step_index=3,
            kind=run_event_pb2.STEP_KIND_SYNTHESIZE,
            description="answer",
        )
    )
    events[8].token_delta.CopyFrom(run_event_pb2.TokenDelta(step_id="s3", text="17 * 23 = "))
    events[9].token_delta.CopyFrom(run_event_pb2.TokenDelta(step_id="s3", text="391"))
    events[10].step_finished.CopyFrom(run_event_pb2.StepFinished(step_id="s3", success=True))
    events[11].run_finished.status = run_pb2.RUN_STATUS_SUCCEEDED
    events[11].run_finished.output = "17 * 23 = 391"
    for sequence, event in enumerate(events, start=1):
        event.event_id = f"e-{sequence}"
        event.run_id = run_id
        event.sequence = sequence
    return events


EVENTS = len(script_events("x"))


async def start_gateway() -> tuple[grpc.aio.Server, ScriptedGateway, str]:
    server = grpc.aio.server()
    servicer = ScriptedGateway()  # type: ignore[abstract]  # answers only what the tests call
    gw_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


@contextlib.contextmanager
def threaded_gateway() -> Iterator[tuple[str, ScriptedGateway]]:
    """The scripted gateway on an event loop of its own (for blocking clients and processes)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, servicer, address = asyncio.run_coroutine_threadsafe(start_gateway(), loop).result(30)
    try:
        yield address, servicer
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
