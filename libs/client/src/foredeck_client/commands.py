"""The ``foredeck`` commands that talk to a gateway: run, runs, show, approve, agents, keys.

Each prints for people on a terminal (a live display drawn with ``rich``), plain lines when its
output is piped, and one JSON document per line with ``--json``. Errors become one readable line
on stderr with what to do next; no stack trace. Exit codes: 0 success, 1 the run failed,
2 a usage or configuration problem, 3 the run was cancelled, 4 an error from Foredeck.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from foredeck.common.v1 import (
    journal_pb2,
    run_event_pb2,
    run_pb2,
)
from foredeck.gateway.v1 import api_key_pb2
from foredeck_client.errors import ConfigurationError, ForedeckError
from foredeck_client.sync import Client
from foredeck_client.trace import RunNode, load_tree, render_png, render_text, usage_text

__all__ = ["add_commands"]

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_ERROR = 4

_STATUS_EXIT = {
    run_pb2.RUN_STATUS_SUCCEEDED: EXIT_OK,
    run_pb2.RUN_STATUS_FAILED: EXIT_RUN_FAILED,
    run_pb2.RUN_STATUS_DEAD_LETTERED: EXIT_RUN_FAILED,
    run_pb2.RUN_STATUS_CANCELLED: EXIT_CANCELLED,
}
_ARGUMENT_PREVIEW = 120
_RESULT_PREVIEW = 160

Commands = argparse._SubParsersAction  # argparse exposes no public name


def _status_name(status: run_pb2.RunStatus.ValueType) -> str:
    return run_pb2.RunStatus.Name(status).removeprefix("RUN_STATUS_").lower()


def _kind_name(kind: run_event_pb2.StepKind.ValueType) -> str:
    return run_event_pb2.StepKind.Name(kind).removeprefix("STEP_KIND_").lower()


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _json_line(out: TextIO, kind: str, message: Message | dict[str, Any]) -> None:
    body = message if isinstance(message, dict) else _as_dict(message)
    out.write(json.dumps({kind: body}, ensure_ascii=False) + "\n")
    out.flush()


# How a run's events are shown.


class RunView(Protocol):
    def start(self, run: run_pb2.Run) -> None: ...
    def event(self, event: run_event_pb2.RunEvent) -> None: ...
    def finish(self, run: run_pb2.Run) -> None: ...


@dataclass
class _Step:
    index: int
    kind: str
    description: str
    started: float
    state: str = "running"
    seconds: float | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(style, text) lines under the step: tool calls and their results, errors."""


class LiveView:
    """A live display on a terminal: steps as they run, tool calls, the answer as it streams."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.steps: dict[str, _Step] = {}
        self.answer = ""
        self.status = "queued"
        self.run_id = ""
        self.live = Live(console=console, refresh_per_second=12, transient=False)

    def start(self, run: run_pb2.Run) -> None:
        self.run_id = run.run_id
        self.status = _status_name(run.status)
        self.live.start()
        self._draw()

    def _draw(self) -> None:
        table = Table.grid(padding=(0, 1))
        table.add_column(width=2)
        table.add_column()
        for step in self.steps.values():
            mark = {"running": "[yellow]…[/]", "ok": "[green]✓[/]", "failed": "[red]✗[/]"}[
                step.state
            ]
            took = f" [dim]{step.seconds:.1f}s[/]" if step.seconds is not None else ""
            table.add_row(
                mark,
                f"[bold]{step.index}[/] {step.kind} [dim]·[/] {escape(step.description)}{took}",
            )
            for style, note in step.notes:
                table.add_row("", Text(note, style=style))
        parts: list[RenderableType] = [
            Text.from_markup(f"[bold]run[/] {self.run_id} [dim]·[/] {self.status}"),
            table,
        ]
        if self.answer:
            parts.append(Text(self.answer))
        self.live.update(Group(*parts))

    def event(self, event: run_event_pb2.RunEvent) -> None:
        payload = event.WhichOneof("payload")
        now = time.monotonic()
        if payload == "status_changed":
            self.status = _status_name(event.status_changed.status)
            if event.status_changed.status == run_pb2.RUN_STATUS_WAITING_APPROVAL:
                self.status += " — `foredeck approve` lists what waits"
        elif payload == "step_started":
            started = event.step_started
            self.steps[started.step_id] = _Step(
                started.step_index, _kind_name(started.kind), started.description, now
            )
        elif payload == "step_finished":
            step = self.steps.get(event.step_finished.step_id)
            if step is not None:
                step.state = "ok" if event.step_finished.success else "failed"
                step.seconds = now - step.started
                if event.step_finished.error.message:
                    step.notes.append(("red", event.step_finished.error.message))
        elif payload == "tool_call_requested":
            call = event.tool_call_requested
            step = self.steps.get(call.step_id)
            arguments = _short(call.tool_call.arguments_json, _ARGUMENT_PREVIEW)
            line = f"→ {call.tool_call.tool_name}({arguments})"
            if call.requires_approval:
                line += f"  waiting for approval {call.approval_id}"
            if step is not None:
                step.notes.append(("cyan", line))
        elif payload == "tool_call_finished":
            result = event.tool_call_finished.result
            step = self.steps.get(event.tool_call_finished.step_id)
            if step is not None:
                style = "red" if result.is_error else "green"
                step.notes.append((style, f"← {_short(result.content, _RESULT_PREVIEW)}"))
        elif payload == "token_delta":
            self.answer += event.token_delta.text
        elif payload == "error":
            step = self.steps.get(event.error.step_id)
            if step is not None:
                step.notes.append(("red", event.error.error.message))
        self._draw()

    def finish(self, run: run_pb2.Run) -> None:
        self.status = _status_name(run.status)
        if run.output:
            self.answer = run.output
        self._draw()
        self.live.stop()
        style = "green" if run.status == run_pb2.RUN_STATUS_SUCCEEDED else "red"
        self.console.print(f"[{style}]{self.status}[/] [dim]·[/] {usage_text(run.usage)}")
        if run.error.message:
            self.console.print(f"[red]{escape(run.error.reason)}: {escape(run.error.message)}[/]")


class PlainView:
    """One line per event, for pipes and logs."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.streamed = False

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def start(self, run: run_pb2.Run) -> None:
        self._say(f"run {run.run_id} {_status_name(run.status)}")

    def event(self, event: run_event_pb2.RunEvent) -> None:
        payload = event.WhichOneof("payload")
        if payload == "status_changed":
            self._say(f"status {_status_name(event.status_changed.status)}")
        elif payload == "step_started":
            s = event.step_started
            self._say(f"step {s.step_index} {_kind_name(s.kind)}: {_short(s.description, 200)}")
        elif payload == "step_finished":
            outcome = "ok" if event.step_finished.success else "failed"
            self._say(f"step done {outcome}: {_short(event.step_finished.summary, 200)}")
        elif payload == "tool_call_requested":
            call = event.tool_call_requested.tool_call
            waiting = (
                " (waiting for approval)" if event.tool_call_requested.requires_approval else ""
            )
            self._say(f"tool {call.tool_name} {call.arguments_json}{waiting}")
        elif payload == "tool_call_finished":
            result = event.tool_call_finished.result
            kind = "error" if result.is_error else "result"
            self._say(f"tool {kind}: {_short(result.content, _RESULT_PREVIEW)}")
        elif payload == "error":
            self._say(f"error: {event.error.error.message}")

    def finish(self, run: run_pb2.Run) -> None:
        self._say(f"{_status_name(run.status)} · {usage_text(run.usage)}")
        if run.error.message:
            self._say(f"error {run.error.reason}: {run.error.message}")
        if run.output:
            self._say("")
            self._say(run.output)


class JsonView:
    """One JSON object per line: ``{"run": ...}``, ``{"event": ...}``, then ``{"run": ...}``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def start(self, run: run_pb2.Run) -> None:
        _json_line(self.out, "run", run)

    def event(self, event: run_event_pb2.RunEvent) -> None:
        _json_line(self.out, "event", event)

    def finish(self, run: run_pb2.Run) -> None:
        _json_line(self.out, "run", run)


def _view(args: argparse.Namespace, out: TextIO) -> RunView:
    if args.json:
        return JsonView(out)
    if out.isatty():
        return LiveView(Console(file=out))
    return PlainView(out)


# Commands.


def _client(args: argparse.Namespace, role: str = "developer") -> Client:
    return Client(
        args.address, args.api_key, data_dir=args.data_dir, role=role, timeout=args.timeout
    )


def _follow(client: Client, run: run_pb2.Run, view: RunView) -> int:
    view.start(run)
    for event in client.watch_run(run.run_id, after_event_id=""):
        view.event(event)
    final = client.get_run(run.run_id)
    view.finish(final)
    return _STATUS_EXIT.get(final.status, EXIT_OK)


def _run(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = client.create_run(
            args.task,
            agent=args.agent,
            labels=dict(label.split("=", 1) for label in args.label or ()),
        )
        if args.detach:
            print(json.dumps({"run": _as_dict(run)}) if args.json else run.run_id)
            return EXIT_OK
        return _follow(client, run, _view(args, sys.stdout))


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, client.get_run(args.run_id), _view(args, sys.stdout))


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]], out: TextIO) -> None:
    if out.isatty():
        table = Table(*columns, box=None, header_style="bold")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        Console(file=out).print(table)
        return
    lines = [list(columns), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for line in lines:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


def _runs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_runs(page_size=args.limit, agent=args.agent)
    if args.json:
        for run in page:
            _json_line(sys.stdout, "run", run)
        return EXIT_OK
    rows = [
        (
            run.run_id,
            _status_name(run.status),
            run.agent_name or "default",
            run.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            if run.create_time.seconds
            else "",
            str(run.step_count),
            str(run.usage.input_tokens + run.usage.output_tokens),
            _short(run.input, 50),
        )
        for run in page
    ]
    _table(("RUN", "STATUS", "AGENT", "CREATED (UTC)", "STEPS", "TOKENS", "TASK"), rows, sys.stdout)
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = client.get_run(args.run_id)
        journal = client.get_run_journal(args.run_id, page_size=500)
    if args.json:
        _json_line(sys.stdout, "run", run)
        for entry in journal:
            _json_line(sys.stdout, "entry", entry)
        return _STATUS_EXIT.get(run.status, EXIT_OK)
    out = sys.stdout
    out.write(
        f"run {run.run_id} · {_status_name(run.status)} · "
        f"agent {run.agent_name} v{run.agent_version}\n"
    )
    out.write(f"task: {run.input}\n")
    for entry in journal:
        outcome = journal_pb2.JournalEntryOutcome.Name(entry.outcome)
        outcome = outcome.removeprefix("JOURNAL_ENTRY_OUTCOME_")
        took = ""
        if entry.end_time.seconds and entry.start_time.seconds:
            seconds = (entry.end_time.ToDatetime() - entry.start_time.ToDatetime()).total_seconds()
            took = f" {seconds:.2f}s"
        out.write(
            f"  {entry.step_index:>3} {_kind_name(entry.kind):<10} {outcome.lower():<9}{took}"
            f"  {_short(entry.description, 80)}\n"
        )
    out.write(f"{usage_text(run.usage)}\n")
    if run.error.message:
        out.write(f"error {run.error.reason}: {run.error.message}\n")
    if run.output:
        out.write(f"\n{run.output}\n")
    return _STATUS_EXIT.get(run.status, EXIT_OK)


def _approve(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.approval_id is None:
            page = client.list_approvals(run_id=args.run or "")
            if args.json:
                for approval in page:
                    _json_line(sys.stdout, "approval", approval)
                return EXIT_OK
            rows = [
                (
                    a.approval_id,
                    a.run_id,
                    a.tool_call.tool_name,
                    _short(a.tool_call.arguments_json, 60),
                )
                for a in page
            ]
            _table(("APPROVAL", "RUN", "TOOL", "ARGUMENTS"), rows, sys.stdout)
            return EXIT_OK
        approval = client.resolve_approval(
            args.approval_id, approve=not args.deny, reason=args.reason
        )
    if args.json:
        _json_line(sys.stdout, "approval", approval)
    else:
        verb = "denied" if args.deny else "approved"
        print(
            f"{verb} {approval.approval_id} "
            f"({approval.tool_call.tool_name} in run {approval.run_id})"
        )
    return EXIT_OK


def _agents(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.name:
            agent = client.get_agent(args.name)
            if args.json:
                _json_line(sys.stdout, "agent", agent)
            else:
                print(json.dumps(_as_dict(agent), indent=2, ensure_ascii=False))
            return EXIT_OK
        page = client.list_agents(page_size=200)
    if args.json:
        for agent in page:
            _json_line(sys.stdout, "agent", agent)
        return EXIT_OK
    rows = [
        (
            a.name,
            str(a.version),
            a.model or "(default)",
            ", ".join(a.allowed_tools),
            _short(a.description, 50),
        )
        for a in page
    ]
    _table(("AGENT", "VERSION", "MODEL", "TOOLS", "DESCRIPTION"), rows, sys.stdout)
    return EXIT_OK


def _keys(args: argparse.Namespace) -> int:
    with _client(args, role="admin") as client:
        if args.keys_command == "create":
            created = client.create_api_key(
                args.tenant, args.user, args.name, permissions=args.permission or ()
            )
            if args.json:
                key = {**_as_dict(created.api_key), "secret": created.secret}
                _json_line(sys.stdout, "api_key", key)
            else:
                print(f"created {created.api_key.api_key_id} for {args.tenant}/{args.user}")
                print(f"secret (shown once): {created.secret}")
            return EXIT_OK
        if args.keys_command == "revoke":
            revoked = client.revoke_api_key(args.api_key_id, args.reason)
            print(f"revoked {revoked.api_key_id}")
            return EXIT_OK
        listed = client.list_api_keys(tenant_id=args.tenant or "", page_size=200)
    if args.json:
        for listed_key in listed:
            _json_line(sys.stdout, "api_key", listed_key)
        return EXIT_OK
    rows = [
        (
            k.api_key_id,
            k.prefix,
            k.tenant_id,
            k.user_id,
            api_key_pb2.ApiKeyState.Name(k.state).removeprefix("API_KEY_STATE_").lower(),
            k.display_name,
        )
        for k in listed
    ]
    _table(("KEY", "PREFIX", "TENANT", "USER", "STATE", "NAME"), rows, sys.stdout)
    return EXIT_OK


def _trace(args: argparse.Namespace) -> int:
    with _client(args) as client:
        root = load_tree(client, args.run_id)
    if args.json:
        for depth, row in root.walk():
            if isinstance(row, RunNode):
                _json_line(sys.stdout, "run", {"depth": depth, **_as_dict(row.run)})
            else:
                _json_line(sys.stdout, "entry", {"depth": depth, **_as_dict(row.entry)})
    else:
        sys.stdout.write(render_text(root))
    if args.png is not None:
        try:
            render_png(root, args.png)
        except ImportError:
            print(
                "foredeck trace: --png needs matplotlib: pip install 'foredeck-client[png]'",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if not args.json:
            print(f"waterfall chart written to {args.png}")
    return EXIT_OK


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn every failure into one readable line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ConfigurationError as error:
            print(f"foredeck: {error.message}", file=sys.stderr)
            return EXIT_USAGE
        except ForedeckError as error:
            hint = f"\n  {error.hint}" if error.hint else ""
            details = "".join(
                f"\n  {violation.field}: {violation.description}"
                for violation in error.field_violations
            )
            if error.retry_after is not None:
                details += f"\n  retry after {error.retry_after:g} s"
            print(f"foredeck {args.command}: {error}{details}{hint}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print(f"foredeck {args.command}: interrupted", file=sys.stderr)
            return 130

    return run


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="gateway host:port (default: FOREDECK_ADDRESS, then the local stack)"
    )
    parser.add_argument(
        "--api-key", help="credential (default: FOREDECK_API_KEY, then the local stack's key)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="local stack data directory (default: nearest .foredeck)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per call (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, one object per line")


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Register the commands that call the gateway."""
    run = commands.add_parser("run", help="run an agent on a task and show it live")
    run.add_argument("task", help="what the agent should do, in plain words")
    run.add_argument("--agent", default="", help="agent name (default: the tenant's default)")
    run.add_argument("--label", action="append", metavar="KEY=VALUE", help="label the run")
    run.add_argument("--detach", action="store_true", help="print the run id and return")
    _connection_arguments(run)
    run.set_defaults(handler=_guarded(_run))

    watch = commands.add_parser("watch", help="follow a run's events until it finishes")
    watch.add_argument("run_id", metavar="RUN")
    _connection_arguments(watch)
    watch.set_defaults(handler=_guarded(_watch))

    runs = commands.add_parser("runs", help="list your recent runs")
    runs.add_argument("--agent", default="", help="only runs of this agent")
    runs.add_argument("--limit", type=int, default=20, help="how many (default: %(default)s)")
    _connection_arguments(runs)
    runs.set_defaults(handler=_guarded(_runs))

    show = commands.add_parser("show", help="a run's steps, totals and answer")
    show.add_argument("run_id", metavar="RUN")
    _connection_arguments(show)
    show.set_defaults(handler=_guarded(_show))

    approve = commands.add_parser(
        "approve", help="list tool calls waiting for approval, or approve/deny one"
    )
    approve.add_argument("approval_id", nargs="?", metavar="APPROVAL")
    approve.add_argument("--deny", action="store_true", help="deny instead of approving")
    approve.add_argument("--reason", default="", help="why (shown to the agent on denial)")
    approve.add_argument("--run", help="only approvals of this run (when listing)")
    _connection_arguments(approve)
    approve.set_defaults(handler=_guarded(_approve))

    trace = commands.add_parser(
        "trace", help="a run's step tree with timings, tokens and cost (sub-agents included)"
    )
    trace.add_argument("run_id", metavar="RUN")
    trace.add_argument("--png", type=Path, metavar="FILE", help="also draw a waterfall chart")
    _connection_arguments(trace)
    trace.set_defaults(handler=_guarded(_trace))

    agents = commands.add_parser("agents", help="list agents, or show one")
    agents.add_argument("name", nargs="?", metavar="NAME")
    _connection_arguments(agents)
    agents.set_defaults(handler=_guarded(_agents))

    keys = commands.add_parser("keys", help="manage API keys (needs an admin credential)")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    key_list = key_commands.add_parser("list", help="list keys")
    key_list.add_argument("--tenant", help="only keys of this tenant")
    key_create = key_commands.add_parser("create", help="create a key and print its secret once")
    key_create.add_argument("--tenant", required=True)
    key_create.add_argument("--user", required=True)
    key_create.add_argument("--name", required=True, help="a name for people")
    key_create.add_argument("--permission", action="append", help="grant a permission")
    key_revoke = key_commands.add_parser("revoke", help="revoke a key")
    key_revoke.add_argument("api_key_id", metavar="KEY")
    key_revoke.add_argument("--reason", default="")
    for parser in (key_list, key_create, key_revoke):
        _connection_arguments(parser)
    keys.set_defaults(
        handler=_guarded(_keys),
        keys_command="list",
        tenant=None,
        address=None,
        api_key=None,
        data_dir=None,
        timeout=30.0,
        json=False,
    )
