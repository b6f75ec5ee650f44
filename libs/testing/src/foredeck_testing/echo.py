"""``foredeck.kittest.v1.EchoService``: a schema-free service for testing the runtime itself.

Methods use ``google.protobuf.StringValue`` in and out, so tests need no generated contracts.
Tests build handlers with :func:`unary`, :func:`server_stream`, :func:`client_stream` and
:func:`bidi_stream`, register them with :func:`register`, and call them with
:func:`unary_call` / :func:`stream_call`. ``python -m foredeck_testing.echo`` runs an
``Echo`` method as a real process through :func:`foredeck_kit.server.serve`, configured from
``FOREDECK_DEMO_*`` variables; it logs a ``listening`` line with its port to standard output.
Its ``Chatter`` method logs as many lines as the request's value says, for tests of what
happens when nobody reads those lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import wrappers_pb2
from pydantic_settings import SettingsConfigDict

from foredeck_kit.errors import domain_for
from foredeck_kit.logs import get_logger
from foredeck_kit.server import Register, build_grpc_server, serve
from foredeck_kit.settings import ServiceSettings, load_settings
from foredeck_kit.telemetry import setup_telemetry

__all__ = [
    "SERVICE_NAME",
    "DemoSettings",
    "Message",
    "bidi_stream",
    "client_stream",
    "full_method",
    "main",
    "register",
    "server_stream",
    "stream_call",
    "unary",
    "unary_call",
]

SERVICE_NAME = "foredeck.kittest.v1.EchoService"
Message = wrappers_pb2.StringValue
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

_DESERIALIZE = wrappers_pb2.StringValue.FromString
_SERIALIZE = wrappers_pb2.StringValue.SerializeToString


def full_method(name: str) -> str:
    """Return ``/foredeck.kittest.v1.EchoService/<name>``."""
    return f"/{SERVICE_NAME}/{name}"


def unary(fn: Callable[[Message, Context], Awaitable[Message]]) -> Handler:
    """A unary-unary handler."""
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=_DESERIALIZE, response_serializer=_SERIALIZE
    )


def server_stream(fn: Callable[[Message, Context], AsyncIterator[Message]]) -> Handler:
    """A unary-stream handler."""
    return grpc.unary_stream_rpc_method_handler(
        fn, request_deserializer=_DESERIALIZE, response_serializer=_SERIALIZE
    )


def client_stream(fn: Callable[[AsyncIterator[Message], Context], Awaitable[Message]]) -> Handler:
    """A stream-unary handler."""
    return grpc.stream_unary_rpc_method_handler(
        fn, request_deserializer=_DESERIALIZE, response_serializer=_SERIALIZE
    )


def bidi_stream(
    fn: Callable[[AsyncIterator[Message], Context], AsyncIterator[Message]],
) -> Handler:
    """A stream-stream handler."""
    return grpc.stream_stream_rpc_method_handler(
        fn, request_deserializer=_DESERIALIZE, response_serializer=_SERIALIZE
    )


def register(handlers: Mapping[str, Handler]) -> Register:
    """Return a register callback adding ``handlers`` (method name -> handler) to a server."""

    def add(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, dict(handlers)),)
        )

    return add


def unary_call(channel: grpc.aio.Channel, name: str) -> Any:
    """A unary-unary callable for method ``name`` on ``channel``."""
    return channel.unary_unary(
        full_method(name), request_serializer=_SERIALIZE, response_deserializer=_DESERIALIZE
    )


def stream_call(channel: grpc.aio.Channel, name: str) -> Any:
    """A unary-stream callable for method ``name`` on ``channel``."""
    return channel.unary_stream(
        full_method(name), request_serializer=_SERIALIZE, response_deserializer=_DESERIALIZE
    )


class DemoSettings(ServiceSettings):
    """Settings of the demo process, read from ``FOREDECK_DEMO_*``."""

    model_config = SettingsConfigDict(env_prefix="FOREDECK_DEMO_")

    service_name: str = "demo"


async def _echo(request: Message, context: Context) -> Message:
    return Message(value=request.value)


async def _chatter(request: Message, context: Context) -> Message:
    logger = get_logger("foredeck.demo")
    for number in range(int(request.value or "0")):
        logger.info("chatter", line=number)
    return Message(value=request.value)


def main() -> int:
    """Run the echo service until SIGTERM or SIGINT; exit 0 after a graceful stop."""
    settings = load_settings(DemoSettings)
    telemetry = setup_telemetry(settings.service_name, settings)
    try:
        host = build_grpc_server(
            settings,
            domain=domain_for(settings.service_name),
            register=register({"Echo": unary(_echo), "Chatter": unary(_chatter)}),
            service_names=[SERVICE_NAME],
            verifier=settings.principal_verifier(),
            telemetry=telemetry,
        )
        return asyncio.run(serve(host))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
