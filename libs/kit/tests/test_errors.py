"""Errors: the rich status on the wire, as a real aio client receives it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from foredeck_kit.errors import (
    INTERNAL_MESSAGE,
    MAX_STATUS_BYTES,
    MAX_VIOLATIONS,
    OMITTED_VIOLATIONS_KEY,
    STATUS_DETAILS_KEY,
    FieldViolation,
    QuotaViolation,
    Reason,
    ServiceError,
    domain_for,
    error_details,
    missing_shared_reasons,
    reason_from_enum,
    reason_to_enum,
    to_status,
)
from foredeck_testing.echo import (
    Message,
    bidi_stream,
    client_stream,
    register,
    server_stream,
    stream_call,
    unary,
    unary_call,
)
from foredeck_testing.server import RunningServer, running_server

DOMAIN = "kittest.foredeck.dev"
SECRET = "db-password-hunter2"


def _unpack_all(status: Any) -> list[Any]:
    out: list[Any] = []
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                out.append(message)
    return out


def test_reason_must_be_upper_snake() -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        ServiceError(grpc.StatusCode.NOT_FOUND, "not-found", "missing")
    with pytest.raises(ValueError, match="OK"):
        ServiceError(grpc.StatusCode.OK, "FINE", "fine")


def test_internal_message_is_always_generic() -> None:
    error = ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, f"boom {SECRET}")
    assert error.message == INTERNAL_MESSAGE
    assert to_status(error, DOMAIN).details == INTERNAL_MESSAGE


def test_status_has_one_error_info_first_then_details_in_order() -> None:
    error = ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        "slow down",
        metadata={"limit": "100"},
        field_violations=[("messages[0].content", "too long")],
        retry_after=timedelta(seconds=1.5),
        quota_violations=[("tenant:t1", "100 calls per minute")],
    )
    status = to_status(error, DOMAIN)
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.details == "slow down"
    (key, value), *_ = status.trailing_metadata
    assert key == STATUS_DETAILS_KEY
    details = _unpack_all(status_pb2.Status.FromString(value))
    assert [type(d).__name__ for d in details] == [
        "ErrorInfo",
        "BadRequest",
        "RetryInfo",
        "QuotaFailure",
    ]
    info, bad, retry, quota = details
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "RATE_LIMITED",
        DOMAIN,
        {"limit": "100"},
    )
    assert bad.field_violations[0].field == "messages[0].content"
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=1.5)
    assert quota.violations[0].subject == "tenant:t1"


def test_convenience_constructors_use_shared_reasons_and_codes() -> None:
    cases = {
        ServiceError.principal_missing(): (
            grpc.StatusCode.UNAUTHENTICATED,
            Reason.PRINCIPAL_MISSING,
        ),
        ServiceError.principal_invalid(): (
            grpc.StatusCode.UNAUTHENTICATED,
            Reason.PRINCIPAL_INVALID,
        ),
        ServiceError.principal_expired(): (
            grpc.StatusCode.UNAUTHENTICATED,
            Reason.PRINCIPAL_EXPIRED,
        ),
        ServiceError.permission_missing("tools:run"): (
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.PERMISSION_MISSING,
        ),
        ServiceError.invalid_request([("name", "required")]): (
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
        ),
        ServiceError.request_too_large("content", 10, 11): (
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.REQUEST_TOO_LARGE,
        ),
        ServiceError.deadline_too_short(timedelta(seconds=1)): (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            Reason.DEADLINE_TOO_SHORT,
        ),
        ServiceError.downstream_unavailable("memory"): (
            grpc.StatusCode.UNAVAILABLE,
            Reason.DOWNSTREAM_UNAVAILABLE,
        ),
        ServiceError.store_unavailable("redis"): (
            grpc.StatusCode.UNAVAILABLE,
            Reason.STORE_UNAVAILABLE,
        ),
        ServiceError.shutting_down(): (grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN),
        ServiceError.internal(): (grpc.StatusCode.INTERNAL, Reason.INTERNAL),
        ServiceError.request_id_reused("r-1"): (
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.REQUEST_ID_REUSED,
        ),
        ServiceError.page_token_invalid(): (
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.PAGE_TOKEN_INVALID,
        ),
        # The contracts give every shared reason one code; delegation refusals are this one.
        ServiceError(
            grpc.StatusCode.PERMISSION_DENIED, Reason.DELEGATION_NOT_ALLOWED, "gateway only"
        ): (grpc.StatusCode.PERMISSION_DENIED, Reason.DELEGATION_NOT_ALLOWED),
    }
    for error, (code, reason) in cases.items():
        assert (error.code, error.reason) == (code, reason)
    assert {reason for _, reason in cases.values()} == set(Reason)
    assert ServiceError.downstream_unavailable("memory").retry_after is not None
    assert ServiceError.store_unavailable("redis").retry_after is not None
    with pytest.raises(ValueError, match="violation"):
        ServiceError.invalid_request([])


def test_enum_names_map_to_reasons_and_back() -> None:
    assert reason_from_enum("ERROR_REASON_PRINCIPAL_MISSING") == "PRINCIPAL_MISSING"
    assert reason_to_enum("PRINCIPAL_MISSING") == "ERROR_REASON_PRINCIPAL_MISSING"
    with pytest.raises(ValueError, match="UNSPECIFIED"):
        reason_from_enum("ERROR_REASON_UNSPECIFIED")
    with pytest.raises(ValueError, match="ERROR_REASON_"):
        reason_from_enum("PRINCIPAL_MISSING")
    complete = ["ERROR_REASON_UNSPECIFIED", *(reason_to_enum(r) for r in Reason), "ERROR_REASON_X"]
    assert missing_shared_reasons(complete) == []
    assert missing_shared_reasons(complete[:-4]) == [
        Reason.REQUEST_ID_REUSED,
        Reason.PAGE_TOKEN_INVALID,
        Reason.DELEGATION_NOT_ALLOWED,
    ]


def test_domain_for() -> None:
    assert domain_for("memory") == "memory.foredeck.dev"
    with pytest.raises(ValueError, match="single label"):
        domain_for("memory.v1")


def test_error_details_without_rich_status() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down", None
    )
    details = error_details(error)
    assert (details.code, details.message, details.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "down",
        None,
    )


def test_delegation_refusal_is_shared_reason_14() -> None:
    error = ServiceError.delegation_not_allowed()
    assert (error.code, error.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        Reason.DELEGATION_NOT_ALLOWED,
    )
    assert Reason.numbered()[-1] == (Reason.DELEGATION_NOT_ALLOWED, 14)


def _wire_size(status: grpc.Status) -> int:
    ((key, value),) = status.trailing_metadata
    assert key == STATUS_DETAILS_KEY
    return len(value)


def test_metadata_and_violations_that_are_not_strings_are_coerced() -> None:
    error = ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        "slow down",
        metadata={"limit": 100, "window": timedelta(seconds=60), 7: None},  # type: ignore[dict-item]
        field_violations=[(3, ValueError("bad"))],
        quota_violations=[("tenant:t1", 100)],
    )
    assert error.metadata == {"limit": "100", "window": "0:01:00", "7": "None"}
    status = to_status(error, DOMAIN)
    info, bad, quota = _unpack_all(status_pb2.Status.FromString(status.trailing_metadata[0][1]))
    assert dict(info.metadata) == {"limit": "100", "window": "0:01:00", "7": "None"}
    assert (bad.field_violations[0].field, bad.field_violations[0].description) == ("3", "bad")
    assert quota.violations[0].description == "100"


def test_status_stays_small_whatever_the_error_holds() -> None:
    huge = "x" * 100_000
    error = ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        huge,
        metadata={f"key{i}": huge for i in range(100)},
        field_violations=[(f"items[{i}].{huge}", huge) for i in range(200)],
        retry_after=timedelta(seconds=1),
        quota_violations=[(huge, "\u20ac" * 50_000)] * 50,
    )
    status = to_status(error, DOMAIN)
    assert _wire_size(status) <= MAX_STATUS_BYTES
    assert len(status.details.encode()) <= 256
    assert status.details.endswith("\u2026")

    many = ServiceError.invalid_request(
        [(f"messages[{i}].content", "too long") for i in range(200)]
    )
    status = to_status(many, DOMAIN)
    assert _wire_size(status) <= MAX_STATUS_BYTES
    info, bad = _unpack_all(status_pb2.Status.FromString(status.trailing_metadata[0][1]))
    assert len(bad.field_violations) == MAX_VIOLATIONS
    assert bad.field_violations[0].field == "messages[0].content"
    assert info.metadata[OMITTED_VIOLATIONS_KEY] == str(200 - MAX_VIOLATIONS)
    assert info.reason == Reason.INVALID_REQUEST

    few = to_status(ServiceError.invalid_request([("a", "b")]), DOMAIN)
    (info, _) = _unpack_all(status_pb2.Status.FromString(few.trailing_metadata[0][1]))
    assert OMITTED_VIOLATIONS_KEY not in info.metadata


def test_lone_surrogates_do_not_break_the_status() -> None:
    raw = b"report-\xff.csv".decode("utf-8", "surrogateescape")
    error = ServiceError(
        grpc.StatusCode.NOT_FOUND,
        "FILE_NOT_FOUND",
        f"no file {raw}",
        metadata={"file": raw, raw: "x"},
        field_violations=[(raw, raw)],
    )
    status = to_status(error, DOMAIN)
    assert status.details == "no file report-?.csv"
    info, bad = _unpack_all(status_pb2.Status.FromString(status.trailing_metadata[0][1]))
    assert dict(info.metadata) == {"file": "report-?.csv", "report-?.csv": "x"}
    assert bad.field_violations[0].field == "report-?.csv"


def test_status_size_bound_holds_for_random_errors() -> None:
    rng = random.Random(3)

    def text(limit: int) -> str:
        return "".join(rng.choices("a\u00e9\u20ac\U0001f600", k=rng.randint(0, limit)))

    for _ in range(100):
        error = ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            text(2000),
            metadata={text(100): text(1000) for _ in range(rng.randint(0, 40))},
            field_violations=[(text(300), text(600)) for _ in range(rng.randint(0, 60))],
            quota_violations=[(text(300), text(600)) for _ in range(rng.randint(0, 60))],
            retry_after=timedelta(seconds=3) if rng.random() < 0.5 else None,
        )
        status = to_status(error, DOMAIN)
        assert _wire_size(status) <= MAX_STATUS_BYTES
        # Every clipped text is still valid UTF-8 that round-trips through protobuf.
        assert status_pb2.Status.FromString(status.trailing_metadata[0][1]).code == 3


# --- on the wire ------------------------------------------------------------------------


async def _typed(request: Message, context: Any) -> Message:
    raise ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        "request invalid",
        metadata={"hint": "see fields"},
        field_violations=[("value", "must not be empty"), ("other", "too long")],
        retry_after=timedelta(milliseconds=250),
    )


async def _crash(request: Message, context: Any) -> Message:
    raise RuntimeError(f"connection to postgres failed: {SECRET}")


async def _abort(request: Message, context: Any) -> Message:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returned")


async def _stream_then_fail(request: Message, context: Any) -> AsyncIterator[Message]:
    for i in range(3):
        yield Message(value=str(i))
    if request.value == "typed":
        raise ServiceError.store_unavailable("redis", timedelta(seconds=2))
    raise KeyError(SECRET)


async def _sum(requests: AsyncIterator[Message], context: Any) -> Message:
    parts = [r.value async for r in requests]
    if "bad" in parts:
        raise ServiceError.invalid_request([("value", "bad part")])
    return Message(value="".join(parts))


async def _chat(requests: AsyncIterator[Message], context: Any) -> AsyncIterator[Message]:
    async for r in requests:
        if r.value == "crash":
            raise ValueError(SECRET)
        yield Message(value=r.value.upper())


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[RunningServer]:
    handlers = {
        "Typed": unary(_typed),
        "Crash": unary(_crash),
        "Abort": unary(_abort),
        "StreamFail": server_stream(_stream_then_fail),
        "Sum": client_stream(_sum),
        "Chat": bidi_stream(_chat),
    }
    async with running_server(
        register(handlers), service_names=["foredeck.kittest.v1.EchoService"], domain=DOMAIN
    ) as srv:
        yield srv


def _assert_no_leak(error: grpc.aio.AioRpcError) -> None:
    wire = repr(error.details()) + repr(error.trailing_metadata()) + repr(error.initial_metadata())
    assert SECRET not in wire
    assert "Traceback" not in wire
    for exception_name in ("RuntimeError", "KeyError", "ValueError"):
        assert exception_name not in wire


async def test_typed_error_arrives_with_rich_details(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary_call(server.channel, "Typed")(Message(value="x"), metadata=server.mint())
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "request invalid"

    # The stock grpc_status parser accepts aio errors too (their accessors are synchronous).
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    details = _unpack_all(status)
    assert [type(d).__name__ for d in details] == ["ErrorInfo", "BadRequest", "RetryInfo"]
    assert sum(isinstance(d, error_details_pb2.ErrorInfo) for d in details) == 1

    parsed = error_details(error)
    assert parsed.reason == "INVALID_REQUEST"
    assert parsed.domain == DOMAIN
    assert parsed.metadata == {"hint": "see fields"}
    assert parsed.field_violations == (
        FieldViolation("value", "must not be empty"),
        FieldViolation("other", "too long"),
    )
    assert parsed.retry_after == timedelta(milliseconds=250)
    assert parsed.quota_violations == ()


async def test_unexpected_exception_is_internal_without_leaks(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary_call(server.channel, "Crash")(Message(), metadata=server.mint())
    error = caught.value
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == INTERNAL_MESSAGE
    parsed = error_details(error)
    assert (parsed.reason, parsed.domain) == (Reason.INTERNAL, DOMAIN)
    _assert_no_leak(error)


async def test_handler_abort_passes_through_untouched(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary_call(server.channel, "Abort")(Message(), metadata=server.mint())
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no such thing"
    assert error_details(caught.value).reason is None


@pytest.mark.parametrize(
    ("mode", "code", "reason"),
    [
        ("typed", grpc.StatusCode.UNAVAILABLE, Reason.STORE_UNAVAILABLE),
        ("crash", grpc.StatusCode.INTERNAL, Reason.INTERNAL),
    ],
)
async def test_stream_failing_midway_is_mapped(
    server: RunningServer, mode: str, code: grpc.StatusCode, reason: Reason
) -> None:
    received: list[str] = []
    call = stream_call(server.channel, "StreamFail")(Message(value=mode), metadata=server.mint())

    async def drain() -> None:
        async for item in call:
            received.append(item.value)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain()
    assert received == ["0", "1", "2"]
    assert caught.value.code() is code
    parsed = error_details(caught.value)
    assert (parsed.reason, parsed.domain) == (reason, DOMAIN)
    if mode == "typed":
        assert parsed.retry_after == timedelta(seconds=2)
        assert parsed.metadata == {"store": "redis"}
    else:
        assert caught.value.details() == INTERNAL_MESSAGE
    _assert_no_leak(caught.value)


async def test_client_streaming_and_bidi_handlers_are_mapped(server: RunningServer) -> None:
    sum_call = server.channel.stream_unary(
        "/foredeck.kittest.v1.EchoService/Sum",
        request_serializer=Message.SerializeToString,
        response_deserializer=Message.FromString,
    )
    ok = await sum_call(iter([Message(value="a"), Message(value="b")]), metadata=server.mint())
    assert ok.value == "ab"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sum_call(iter([Message(value="bad")]), metadata=server.mint())
    assert error_details(caught.value).field_violations == (FieldViolation("value", "bad part"),)

    chat = server.channel.stream_stream(
        "/foredeck.kittest.v1.EchoService/Chat",
        request_serializer=Message.SerializeToString,
        response_deserializer=Message.FromString,
    )
    replies = [
        r.value
        async for r in chat(
            iter([Message(value="hi"), Message(value="yo")]), metadata=server.mint()
        )
    ]
    assert replies == ["HI", "YO"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in chat(
            iter([Message(value="a"), Message(value="crash")]), metadata=server.mint()
        ):
            pass
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    _assert_no_leak(caught.value)


async def test_quota_failure_round_trip(server: RunningServer) -> None:
    async def limited(request: Message, context: Any) -> Message:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            "rate limited",
            retry_after=timedelta(seconds=3),
            quota_violations=[("user:u1", "10 per minute")],
        )

    async with running_server(
        register({"Limited": unary(limited)}),
        service_names=["foredeck.kittest.v1.EchoService"],
        domain=DOMAIN,
    ) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(
                unary_call(srv.channel, "Limited")(Message(), metadata=srv.mint()), 10
            )
    parsed = error_details(caught.value)
    assert parsed.quota_violations == (QuotaViolation("user:u1", "10 per minute"),)
    assert parsed.retry_after == timedelta(seconds=3)


async def test_hundreds_of_violations_and_huge_texts_reach_the_client(
    server: RunningServer,
) -> None:
    async def bloated(request: Message, context: Any) -> Message:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "invalid request " + "m" * 50_000,
            metadata={"detail": "d" * 50_000, "count": 200},
            field_violations=[
                (f"messages[{i}].content", "must be at most 4096 characters long " * 2)
                for i in range(200)
            ],
        )

    async with running_server(
        register({"Bloated": unary(bloated)}),
        service_names=["foredeck.kittest.v1.EchoService"],
        domain=DOMAIN,
    ) as srv:
        for _ in range(5):  # an oversized trailer used to fail at random
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary_call(srv.channel, "Bloated")(Message(), metadata=srv.mint(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            parsed = error_details(caught.value)
            assert (parsed.reason, parsed.domain) == (Reason.INVALID_REQUEST, DOMAIN)
            assert len(parsed.field_violations) == MAX_VIOLATIONS
            assert parsed.metadata[OMITTED_VIOLATIONS_KEY] == str(200 - MAX_VIOLATIONS)
            assert parsed.metadata["count"] == "200"
            assert (caught.value.details() or "").startswith("invalid request mmm")
