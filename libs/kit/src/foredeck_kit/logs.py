"""Structured logging: one JSON object per line, with service, level, timestamp and trace ids.

:func:`configure_logging` sets up structlog for the service's own log calls and routes the
standard library's ``logging`` (grpc, OpenTelemetry, drivers) through the same renderer, so
every line a process writes has the same shape.

Lines never block the event loop: they go into a bounded in-memory buffer that a writer thread
drains to the stream. When the stream stalls (a paused log collector, a full pipe) and the
buffer is full, new lines are dropped and counted (:func:`dropped_log_lines`, exported as
``foredeck_log_lines_dropped_total``); once writing resumes a ``log lines dropped`` line says
how many were lost. :func:`flush_logging` waits for the buffer to drain, with a timeout.
"""

from __future__ import annotations

import atexit
import collections
import datetime
import io
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import orjson
import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "DEFAULT_MAX_BUFFERED_LINES",
    "LogFormat",
    "LogLevel",
    "LogSink",
    "add_trace_ids",
    "configure_logging",
    "dropped_log_lines",
    "emit",
    "flush_logging",
    "get_logger",
    "level_enabled",
    "reset_logging",
]

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

DEFAULT_MAX_BUFFERED_LINES = 10_000
"""Lines held in memory while the stream is slower than the service; more are dropped."""

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_LEVEL_NAMES = {number: name for name, number in _LEVELS.items()}
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z
# structlog's registry of the context variables ``bind_contextvars`` created: while it is
# empty nothing is bound, and scanning the whole context for bound values can be skipped.
_structlog_vars: dict[str, Any] | None = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
_UTC = datetime.UTC


def add_trace_ids(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Add ``trace_id`` and ``span_id`` of the active OpenTelemetry span, when there is one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def _add_service(service_name: str) -> Processor:
    def add_service(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service_name)
        return event_dict

    return add_service


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


def _dumps(value: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> bytes:
    try:
        return orjson.dumps(value, default=default, option=_ORJSON_OPTIONS)
    except TypeError:
        # orjson refuses what the standard library accepts (integers over 64 bits).
        return json.dumps(value, default=default or repr).encode()


def _dumps_text(value: Any, **kwargs: Any) -> str:
    return _dumps(value, **kwargs).decode()


# --- the buffer between the service and its stream -------------------------------------------

_dropped_total = 0
_dropped_lock = threading.Lock()


def dropped_log_lines() -> int:
    """Log lines this process has dropped because its stream did not keep up."""
    return _dropped_total


class _Flush:
    """A marker in the buffer: set once every line queued before it has been written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class LogSink:
    """A bounded buffer of rendered lines that a daemon thread writes to ``stream``.

    :meth:`write` never blocks: when ``max_lines`` lines are waiting, the line is dropped and
    counted. Lines are written in batches, ``linger`` seconds after the first of a batch.
    ``summary`` renders the line reporting how many were dropped; it is written as soon as the
    writer catches up. Streams with a file descriptor are written with ``os.write``, bypassing
    Python's buffered writer, whose lock a thread stuck on a full pipe would otherwise hold at
    interpreter exit.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        max_lines: int = DEFAULT_MAX_BUFFERED_LINES,
        summary: Callable[[int], str | bytes] | None = None,
        linger: float = 0.05,
    ) -> None:
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        self._stream = stream
        self._max_lines = max_lines
        self._summary = summary
        self._linger = linger
        self._queue: collections.deque[Any] = collections.deque()
        self._wakeup = threading.Event()
        self._urgent = threading.Event()
        self._unreported = 0
        self._fd: int | None = None
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            fd = None
        if fd is not None:
            # What the stream buffered so far must come out before our own lines.
            stream.flush()
            self._fd = fd
        self._thread = threading.Thread(target=self._run, name="foredeck-log-writer", daemon=True)
        self._thread.start()

    def write(self, line: str | bytes) -> None:
        """Queue one rendered line (without its newline); drop it when the buffer is full."""
        if len(self._queue) >= self._max_lines:
            global _dropped_total
            with _dropped_lock:
                _dropped_total += 1
                self._unreported += 1
            return
        self._queue.append(line)
        # The writer clears the event before draining, so a line appended after its last
        # drain always finds the event clear and wakes it.
        if not self._wakeup.is_set():
            self._wakeup.set()

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every line queued so far is written; False when ``timeout`` ran out."""
        if not self._thread.is_alive():
            return not self._queue
        marker = _Flush()
        self._queue.append(marker)
        self._urgent.set()
        self._wakeup.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Write what is queued (within ``timeout``) and stop the writer thread."""
        flushed = self.flush(timeout)
        self._queue.append(_STOP)
        self._urgent.set()
        self._wakeup.set()
        if flushed:
            self._thread.join(timeout)
        return flushed

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            # Let lines gather for a moment: one write and one wake-up per batch, not per line
            # (each wake-up makes the event loop's thread hand over the GIL).
            self._urgent.wait(self._linger)
            self._urgent.clear()
            self._wakeup.clear()
            lines: list[bytes] = []
            markers: list[_Flush] = []
            stop = False
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, _Flush):
                    markers.append(item)
                elif item is _STOP:
                    stop = True
                else:
                    lines.append(item if isinstance(item, bytes) else item.encode())
            with _dropped_lock:
                dropped, self._unreported = self._unreported, 0
            if dropped and self._summary is not None:
                summary = self._summary(dropped)
                lines.append(summary if isinstance(summary, bytes) else summary.encode())
            if lines:
                lines.append(b"")
                self._write(b"\n".join(lines))
            for marker in markers:
                marker.done.set()
            if stop:
                return

    def _write(self, data: bytes) -> None:
        try:
            if self._fd is None:
                self._stream.write(data.decode())
                self._stream.flush()
                return
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except (OSError, ValueError):
            # A closed stream loses the lines; the service must keep running regardless.
            pass


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    service: str
    level: int
    json: bool
    sink: LogSink


_config: _Config | None = None
_atexit_registered = False


class _SinkLogger:
    """What structlog writes a rendered line to: the active sink."""

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink

    def msg(self, message: str | bytes) -> None:
        self._sink.write(message)

    log = debug = info = warn = warning = err = error = critical = fatal = exception = msg


class _SinkHandler(logging.Handler):
    """Routes standard library records into the sink; also marks the handler we installed."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.write(self.format(record))
        except Exception:
            self.handleError(record)


def _summary_renderer(service_name: str, json_format: bool) -> Callable[[int], str | bytes]:
    def render(dropped: int) -> str | bytes:
        event = {
            "event": "log lines dropped",
            "dropped": dropped,
            "level": "warning",
            "logger": "foredeck.logs",
            "service": service_name,
            "timestamp": datetime.datetime.now(_UTC),
        }
        if json_format:
            return _dumps(event)
        return f"{event['timestamp']} [warning  ] log lines dropped  dropped={dropped}"

    return render


def configure_logging(
    service_name: str,
    *,
    level: str = "info",
    fmt: LogFormat = "json",
    stream: TextIO | None = None,
    max_buffered_lines: int = DEFAULT_MAX_BUFFERED_LINES,
) -> None:
    """Configure structlog and stdlib logging for this process; call once from ``main()``.

    ``stream`` defaults to standard output, where container runtimes collect logs. Calling it
    again replaces the previous configuration after flushing its buffer.
    """
    global _config, _atexit_registered
    numeric_level = _LEVELS.get(level.lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}")
    out = stream if stream is not None else sys.stdout
    _close_active()
    sink = LogSink(
        out, max_lines=max_buffered_lines, summary=_summary_renderer(service_name, fmt == "json")
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_service(service_name),
        add_trace_ids,
    ]
    tail: list[Processor]
    stdlib_tail: list[Processor]
    if fmt == "json":
        tail = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        stdlib_tail = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps_text),
        ]
    else:
        tail = stdlib_tail = [structlog.dev.ConsoleRenderer(colors=False)]

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_: _SinkLogger(sink),
        # Reconfiguration (tests, reloads) must reach loggers that were already handed out.
        cache_logger_on_first_use=False,
    )

    handler = _SinkHandler(sink)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _drop_color_message],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *stdlib_tail],
        )
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _SinkHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _config = _Config(service=service_name, level=numeric_level, json=fmt == "json", sink=sink)
    if not _atexit_registered:
        # Lines still buffered when the process ends are written, within a bound.
        atexit.register(flush_logging, 2.0)
        _atexit_registered = True


def _close_active(timeout: float = 5.0) -> None:
    global _config
    if _config is not None:
        _config.sink.close(timeout)
        _config = None


def flush_logging(timeout: float | None = 5.0) -> None:
    """Wait until buffered lines are written, or ``timeout`` runs out (a stalled stream)."""
    config = _config
    if config is not None:
        config.sink.flush(timeout)


def level_enabled(level: int) -> bool:
    """Whether a line at ``level`` (a ``logging`` constant) would be written."""
    config = _config
    return config is None or level >= config.level


def emit(
    level: int,
    logger: str,
    event: str,
    fields: dict[str, Any],
    *,
    exc_info: BaseException | None = None,
) -> None:
    """Write one line, skipping structlog's processor chain when the output is JSON.

    The line has the same keys a structlog call would give it (bound context variables,
    ``event``, ``level``, ``timestamp``, ``service``, ``logger``); the caller adds trace ids.
    ``fields`` is consumed. Per-RPC lines go through here because they are the hot path.
    """
    config = _config
    name = _LEVEL_NAMES.get(level, "info")
    if config is None or not config.json:
        getattr(get_logger(logger), name)(event, exc_info=exc_info, **fields)
        return
    if level < config.level:
        return
    if _structlog_vars is None or _structlog_vars:
        bound: Mapping[str, Any] = structlog.contextvars.get_contextvars()
        if bound:
            fields = {**bound, **fields}
    fields["event"] = event
    fields["level"] = name
    fields["timestamp"] = datetime.datetime.now(_UTC)
    fields["service"] = config.service
    fields["logger"] = logger
    if exc_info is not None:
        fields["exception"] = "".join(traceback.format_exception(exc_info)).rstrip("\n")
    config.sink.write(_dumps(fields, default=repr))


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """Return a structlog logger bound to a ``logger`` name and initial values.

    The logger follows the configuration current when it is created, so fetch it where it is
    used rather than holding it from before :func:`configure_logging` ran.
    """
    values: dict[str, Any] = dict(initial)
    if name is not None:
        values["logger"] = name
    return structlog.get_logger().bind(**values)


def reset_logging() -> None:
    """Undo :func:`configure_logging` after writing what is buffered: structlog defaults and
    no handler of ours on the root logger."""
    _close_active()
    structlog.reset_defaults()
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _SinkHandler):
            root.removeHandler(existing)
    root.setLevel(logging.WARNING)
