"""Structured logging: one JSON object per line, with service, level, timestamp and trace ids.

:func:`configure_logging` sets up structlog for the service's own log calls and routes the
standard library's ``logging`` (grpc, OpenTelemetry, drivers) through the same renderer, so
every line a process writes has the same shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "LogFormat",
    "LogLevel",
    "add_trace_ids",
    "configure_logging",
    "get_logger",
    "reset_logging",
]

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


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


class _ForedeckHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed so reconfiguring replaces it, not stacks it."""


def configure_logging(
    service_name: str,
    *,
    level: str = "info",
    fmt: LogFormat = "json",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and stdlib logging for this process; call once from ``main()``.

    ``stream`` defaults to standard output, where container runtimes collect logs.
    """
    numeric_level = _LEVELS.get(level.lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}")
    out = stream if stream is not None else sys.stdout
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_service(service_name),
        add_trace_ids,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        tail = [renderer]

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Reconfiguration (tests, reloads) must reach loggers that were already handed out.
        cache_logger_on_first_use=False,
    )

    handler = _ForedeckHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _drop_color_message],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _ForedeckHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric_level)


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
    """Undo :func:`configure_logging`: structlog defaults and no handler of ours on the root."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _ForedeckHandler):
            root.removeHandler(existing)
    root.setLevel(logging.WARNING)
