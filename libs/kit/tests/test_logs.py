"""Logging never blocks the event loop: a bounded buffer, a writer thread, counted drops."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from foredeck_kit.logs import (
    LogSink,
    configure_logging,
    dropped_log_lines,
    emit,
    flush_logging,
    get_logger,
    reset_logging,
)
from foredeck_kit.metrics import Metrics
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY, PrincipalSigner, generate_key
from foredeck_kit.principal import format_keys as format_principal_keys
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_testing.echo import Message, unary_call


class _StalledStream(io.StringIO):
    """A stream whose writes block until released, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.blocked = threading.Event()

    def write(self, text: str) -> int:
        self.blocked.set()
        self.release.wait()
        return super().write(text)


@pytest.fixture
def stalled() -> Iterator[_StalledStream]:
    stream = _StalledStream()
    yield stream
    stream.release.set()


def test_a_stalled_stream_drops_and_counts_lines_then_reports_them(
    stalled: _StalledStream,
) -> None:
    sink = LogSink(stalled, max_lines=5, summary=lambda n: f"dropped {n}", linger=0)
    before = dropped_log_lines()
    sink.write("first")
    assert stalled.blocked.wait(5)
    # The writer is stuck on "first"; five more fit in the buffer, the rest are dropped.
    for number in range(12):
        sink.write(f"line {number}")
    assert dropped_log_lines() - before == 7
    assert not sink.flush(timeout=0.1)

    stalled.release.set()
    assert sink.flush(timeout=5)
    assert sink.close(timeout=5)
    assert stalled.getvalue().splitlines() == [
        "first",
        *(f"line {number}" for number in range(5)),
        "dropped 7",
    ]


def test_metrics_export_the_drop_count(stalled: _StalledStream) -> None:
    metrics = Metrics()
    sink = LogSink(stalled, max_lines=1, linger=0)
    sink.write("first")
    assert stalled.blocked.wait(5)
    before = metrics.registry.get_sample_value("foredeck_log_lines_dropped_total")
    for _ in range(3):
        sink.write("more")
    after = metrics.registry.get_sample_value("foredeck_log_lines_dropped_total")
    assert before is not None
    assert after == before + 2
    stalled.release.set()
    assert sink.close(timeout=5)


def test_structlog_stdlib_and_rpc_lines_share_the_buffer() -> None:
    stream = io.StringIO()
    configure_logging("kittest", stream=stream)
    try:
        get_logger("foredeck.test").info("from structlog", answer=42)
        logging.getLogger("some.library").warning("from %s", "stdlib")
        emit(logging.INFO, "foredeck.rpc", "rpc", {"method": "/a.v1.A/B", "code": "OK"})
        emit(logging.DEBUG, "foredeck.rpc", "rpc", {"method": "/a.v1.A/Hidden"})
        # Nothing is written on the caller's thread: the lines appear once flushed.
        flush_logging()
    finally:
        reset_logging()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["from structlog", "from stdlib", "rpc"]
    assert all(r["service"] == "kittest" and r["timestamp"].endswith("Z") for r in records)
    assert (records[2]["method"], records[2]["level"], records[2]["logger"]) == (
        "/a.v1.A/B",
        "info",
        "foredeck.rpc",
    )


def test_reset_writes_what_is_buffered() -> None:
    stream = io.StringIO()
    configure_logging("kittest", stream=stream)
    for number in range(100):
        get_logger("foredeck.test").info("line", number=number)
    reset_logging()
    assert len(stream.getvalue().splitlines()) == 100


# --- a real service whose standard output nobody reads ------------------------------------


def _read_until_listening(fd: int) -> dict[str, Any]:
    buffered = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"service exited before listening: {buffered!r}")
        buffered += chunk
        for line in buffered.splitlines():
            if line.startswith(b"{"):
                record: dict[str, Any] = json.loads(line)
                if record.get("event") == "listening":
                    return record


def _read_until_event(fd: int, event: str) -> dict[str, Any]:
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"no {event!r} line before the stream closed")
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            record: dict[str, Any] = json.loads(line)
            if record.get("event") == event:
                return record


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _dropped(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("foredeck_log_lines_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("foredeck_log_lines_dropped_total is not exported")


async def test_a_service_keeps_answering_while_nobody_reads_its_logs() -> None:
    keys = {"k": generate_key()}
    token = PrincipalSigner(keys, "k").mint(tenant_id="t", user_id="u")
    read_fd, write_fd = os.pipe()
    env = {
        **os.environ,
        "FOREDECK_DEMO_PRINCIPAL_KEYS": format_principal_keys(keys),
        "FOREDECK_DEMO_METRICS_PORT": "0",
        "FOREDECK_DEMO_GRACE_PERIOD_SECONDS": "1",
        "OTEL_SDK_DISABLED": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "foredeck_testing.echo", env=env, stdout=write_fd
    )
    os.close(write_fd)
    try:
        async with asyncio.timeout(60):
            listening = await asyncio.to_thread(_read_until_listening, read_fd)
            # From here on nobody reads: the pipe fills after 64 KiB and every write blocks.
            metadata = ((PRINCIPAL_METADATA_KEY, token),)
            async with grpc.aio.insecure_channel(listening["address"]) as channel:
                chatter = unary_call(channel, "Chatter")
                echo = unary_call(channel, "Echo")
                health = health_pb2_grpc.HealthStub(channel)
                # Far more lines than the pipe and the service's buffer hold together.
                await chatter(Message(value="30000"), metadata=metadata, timeout=20)
                for number in range(50):
                    reply = await echo(Message(value=str(number)), metadata=metadata, timeout=5)
                    assert reply.value == str(number)
                    checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert checked.status == health_pb2.HealthCheckResponse.SERVING
                metrics_url = f"http://127.0.0.1:{listening['metrics_port']}/metrics"
                assert _dropped(await asyncio.to_thread(_fetch, metrics_url)) > 0

            # Once the stream moves again, a line says how many were lost.
            summary = await asyncio.to_thread(_read_until_event, read_fd, "log lines dropped")
            assert summary["dropped"] > 0
            assert summary["level"] == "warning"
            process.send_signal(signal.SIGTERM)
            draining = asyncio.create_task(asyncio.to_thread(_drain, read_fd))
            assert await process.wait() == 0
            await draining
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(read_fd)


def _drain(fd: int) -> None:
    while os.read(fd, 65536):
        pass


def test_rpc_lines_carry_bound_context_variables() -> None:
    stream = io.StringIO()
    configure_logging("kittest", stream=stream)
    try:
        emit(logging.INFO, "foredeck.rpc", "rpc", {"method": "/a.v1.A/B"})
        structlog.contextvars.bind_contextvars(run_id="run-7")
        try:
            emit(logging.INFO, "foredeck.rpc", "rpc", {"method": "/a.v1.A/B"})
        finally:
            structlog.contextvars.unbind_contextvars("run_id")
        flush_logging()
    finally:
        reset_logging()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "run_id" not in first
    assert second["run_id"] == "run-7"


def test_telemetry_shutdown_writes_what_is_buffered(stalled: _StalledStream) -> None:
    telemetry = setup_telemetry(
        "kittest",
        ServiceSettings(metrics_port=-1),
        environ={},
        set_global=False,
        log_stream=stalled,
    )
    try:
        for number in range(20):
            get_logger("foredeck.test").info("line", number=number)
        assert stalled.blocked.wait(5)
        # The stream moves again a moment later; shutdown must wait for it, not drop lines.
        threading.Timer(0.2, stalled.release.set).start()
        telemetry.shutdown()
        written = stalled.getvalue().splitlines()
    finally:
        stalled.release.set()
        reset_logging()
    assert [json.loads(line)["number"] for line in written] == list(range(20))
