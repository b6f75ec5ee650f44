"""The built-in tools: ``calculator``, ``current_time``, ``python`` (sandboxed) and
``http_fetch`` (GET through an egress allowlist, off unless granted)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck_toolrunner.adapters.sandbox import (
    Sandbox,
    SandboxLimits,
    SandboxRun,
    SandboxSpec,
    SandboxUnavailable,
)
from foredeck_toolrunner.domain.calculator import CalculatorError, evaluate
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.execution import DEFAULT_MAX_OUTPUT, tool_error
from foredeck_toolrunner.domain.ports import CallContext, RunResult

__all__ = [
    "BUILTIN_NAMES",
    "SANDBOXED_BUILTINS",
    "CalculatorRuntime",
    "CurrentTimeRuntime",
    "HttpFetchRuntime",
    "PythonRuntime",
    "SandboxDefaults",
    "builtin_tools",
]

BUILTIN_NAMES = ("calculator", "current_time", "http_fetch", "python")
SANDBOXED_BUILTINS = ("python",)


def _output(value: Any) -> execution_pb2.ToolOutcome:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return execution_pb2.ToolOutcome(
        output=execution_pb2.ToolOutput(output_json=text, output_bytes=len(text.encode()))
    )


def _failed(message: str, *, retryable: bool = False, **details: Any) -> execution_pb2.ToolOutcome:
    return tool_error(
        execution_pb2.TOOL_ERROR_KIND_TOOL_FAILED,
        message,
        details=details or None,
        retryable=retryable,
    )


def _tool(name: str, description: str, schema: dict[str, Any], timeout_s: int) -> tool_pb2.Tool:
    tool = tool_pb2.Tool(builtin=tool_pb2.BuiltinRuntime(builtin_name=name))
    tool.definition.name = name
    tool.definition.description = description
    tool.definition.parameters_json_schema = json.dumps(schema, separators=(",", ":"))
    tool.policy.timeout.FromSeconds(timeout_s)
    tool.policy.safe_to_log = name != "python"
    return tool


def builtin_tools() -> list[tool_pb2.Tool]:
    """The built-ins registered at start when their names are free (``http_fetch`` is not:
    it needs an operator to register it with a network grant)."""
    python = _tool(
        "python",
        "Runs a Python 3 snippet in an isolated sandbox without network access and returns "
        "what it printed. The JSON object `arguments.input` is available to the code as "
        "`arguments`.",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "minLength": 1, "maxLength": 262144},
                "input": {"type": "object"},
            },
            "required": ["code"],
            "additionalProperties": False,
        },
        30,
    )
    python.policy.filesystem.work_dir = True
    python.policy.output_overflow = tool_pb2.OUTPUT_OVERFLOW_TRUNCATE
    return [
        _tool(
            "calculator",
            "Evaluates an arithmetic expression (+ - * / // % **, parentheses, pi, e, and "
            "sqrt, log, exp, sin, cos, tan, abs, round, min, max, floor, ceil).",
            {
                "type": "object",
                "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": 1000}},
                "required": ["expression"],
                "additionalProperties": False,
            },
            5,
        ),
        _tool(
            "current_time",
            "Returns the current date and time, in UTC or in an IANA time zone such as "
            "Europe/Paris.",
            {
                "type": "object",
                "properties": {"timezone": {"type": "string", "maxLength": 64}},
                "additionalProperties": False,
            },
            5,
        ),
        python,
    ]


class CalculatorRuntime:
    """Safe arithmetic, in process."""

    async def run(self, call: CallContext) -> RunResult:
        """Evaluate ``expression``; an expression that is not allowed is a tool failure."""
        try:
            value = evaluate(str(call.arguments["expression"]))
        except CalculatorError as error:
            return RunResult(_failed(str(error)))
        return RunResult(_output({"result": value}))


class CurrentTimeRuntime:
    """The current time, in process."""

    async def run(self, call: CallContext) -> RunResult:
        """The time now in UTC or the given zone."""
        name = str(call.arguments.get("timezone") or "UTC")
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            return RunResult(_failed(f"unknown time zone {name[:64]!r}"))
        now = datetime.now(UTC)
        return RunResult(
            _output(
                {
                    "iso": now.astimezone(zone).isoformat(),
                    "unix_seconds": now.timestamp(),
                    "timezone": name,
                }
            )
        )


@dataclass(frozen=True, slots=True)
class SandboxDefaults:
    """The runner's default resource limits for sandboxed tools."""

    memory_bytes: int
    cpu_seconds: float
    processes: int
    open_files: int
    file_size_bytes: int
    work_dir_bytes: int


def sandbox_spec(
    policy: tool_pb2.ToolPolicy, defaults: SandboxDefaults, **extra: Any
) -> SandboxSpec:
    """The sandbox a tool's policy asks for, defaults filled in."""
    rl = policy.resource_limits
    cpu = rl.cpu_time.seconds + rl.cpu_time.nanos / 1e9
    limits = SandboxLimits(
        memory_bytes=rl.memory_bytes or defaults.memory_bytes,
        cpu_seconds=cpu or defaults.cpu_seconds,
        processes=rl.max_processes or defaults.processes,
        open_files=rl.max_open_files or defaults.open_files,
        file_size_bytes=rl.max_file_size_bytes or defaults.file_size_bytes,
    )
    fs = policy.filesystem
    return SandboxSpec(
        limits=limits,
        work_dir=fs.work_dir,
        work_dir_bytes=fs.work_dir_max_bytes or defaults.work_dir_bytes,
        read_only_paths=tuple(fs.read_only_paths),
        **extra,
    )


_SIGNALS_OF_LIMITS = {24: "cpu", 25: "file size"}  # SIGXCPU, SIGXFSZ


def sandbox_outcome(
    run: SandboxRun, cpu_limit: float
) -> tuple[execution_pb2.ToolOutcome, str | None]:
    """Turn what the sandbox saw into the agent-facing outcome and a kill cause for metrics."""
    stderr = run.stderr_tail.decode("utf-8", errors="replace")
    details = {"exitCode": run.exit_code, "signal": run.signal, "stderrTail": stderr[-2000:]}
    if run.kill_cause == "timeout":
        return (
            tool_error(
                execution_pb2.TOOL_ERROR_KIND_TIMEOUT,
                "the code ran past the tool's timeout and was stopped",
                retryable=True,
            ),
            "timeout",
        )
    if run.kill_cause == "output":
        # Stopped for flooding its output: what it printed up to the cap is the output, and
        # the executor cuts it or fails the call under the tool's overflow policy.
        stdout = run.stdout.decode("utf-8", errors="ignore")
        outcome = _output({"stdout": stdout, "stderr": stderr})
        outcome.output.output_bytes = max(outcome.output.output_bytes, run.stdout_bytes)
        return outcome, "output"
    if run.signal == 31:  # SIGSYS from the seccomp filter
        return (
            tool_error(
                execution_pb2.TOOL_ERROR_KIND_SANDBOX_VIOLATION,
                "the code made a system call the sandbox forbids and was stopped",
                details=details,
            ),
            "seccomp",
        )
    limit = _SIGNALS_OF_LIMITS.get(run.signal)
    if limit is None and run.signal == 9 and run.cpu_seconds >= cpu_limit:
        limit = "cpu"
    if limit is None and run.exit_code and "MemoryError" in stderr[-400:]:
        limit = "memory"
    if limit is not None:
        return (
            tool_error(
                execution_pb2.TOOL_ERROR_KIND_RESOURCE_LIMIT_EXCEEDED,
                f"the code hit the sandbox's {limit} limit and was stopped",
                details=details,
            ),
            limit.replace(" ", "_"),
        )
    if run.exit_code != 0:
        status = str(run.exit_code) if run.exit_code is not None else f"signal {run.signal}"
        return (
            tool_error(
                execution_pb2.TOOL_ERROR_KIND_NONZERO_EXIT,
                f"the code exited with status {status}",
                details=details,
            ),
            None,
        )
    stdout = run.stdout.decode("utf-8", errors="replace")
    outcome = _output({"stdout": stdout, "stderr": stderr})
    outcome.output.output_bytes = max(outcome.output.output_bytes, run.stdout_bytes)
    return outcome, ("output" if run.kill_cause == "output" else None)


def sandbox_report(run: SandboxRun) -> execution_pb2.SandboxReport:
    """The facts the sandbox measured, for the response."""
    report = execution_pb2.SandboxReport(
        kind=(
            execution_pb2.SANDBOX_KIND_BUBBLEWRAP
            if run.kind == "bubblewrap"
            else execution_pb2.SANDBOX_KIND_PROCESS
        ),
        termination_signal=run.signal,
        max_rss_bytes=run.max_rss_bytes,
        killed_processes=run.killed_processes,
    )
    if run.exit_code is not None:
        report.exit_code = run.exit_code
    report.cpu_time.FromNanoseconds(int(run.cpu_seconds * 1e9))
    return report


class PythonRuntime:
    """Runs a Python snippet in a fresh sandbox per call."""

    def __init__(self, sandbox: Sandbox, defaults: SandboxDefaults) -> None:
        self._sandbox = sandbox
        self._defaults = defaults

    async def run(self, call: CallContext) -> RunResult:
        """Run the snippet to its end, its timeout or its output cap; kill all it started."""
        spec = sandbox_spec(call.tool.policy, self._defaults)
        cap = call.tool.policy.max_output_bytes or DEFAULT_MAX_OUTPUT
        payload = json.dumps(
            {"code": call.arguments["code"], "arguments": call.arguments.get("input", {})}
        ).encode()
        try:
            run = await self._sandbox.run(spec, payload, time_limit=call.timeout, max_output=cap)
        except SandboxUnavailable:
            raise ToolRunnerError.sandbox_unavailable(call.tool.definition.name) from None
        outcome, cause = sandbox_outcome(run, spec.limits.cpu_seconds)
        return RunResult(outcome, sandbox=sandbox_report(run), kill_cause=cause)


def _host_allowed(host: str, port: int, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower()
        entry_host, _, entry_port = (
            entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        )
        if entry_port and not entry_port.isdigit():
            entry_host, entry_port = entry, ""
        if entry_port and int(entry_port) != port:
            continue
        if entry_host.startswith("*."):
            if host.endswith(entry_host[1:]):
                return True
        elif host == entry_host:
            return True
    return False


def _entry_host(entry: str) -> str:
    entry = entry.lower()
    if entry.startswith("["):
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast


class HttpFetchRuntime:
    """An HTTP GET limited by the tool's network grant and a size cap."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes

    async def _resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})

    async def run(self, call: CallContext) -> RunResult:
        """Fetch ``url`` if its host is on the allowlist; anything else is NETWORK_DENIED."""
        grant = call.tool.policy.network
        url = str(call.arguments.get("url", ""))
        parts = urlsplit(url)
        denied = execution_pb2.TOOL_ERROR_KIND_NETWORK_DENIED
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return RunResult(tool_error(denied, "only http and https URLs can be fetched"))
        port = parts.port or (443 if parts.scheme == "https" else 80)
        allowed = list(grant.allowed_hosts)
        if grant.access != tool_pb2.NETWORK_ACCESS_ALLOWLIST or not _host_allowed(
            parts.hostname, port, allowed
        ):
            return RunResult(tool_error(denied, f"the tool may not reach {parts.hostname}"))
        try:
            addresses = await self._resolve(parts.hostname, port)
        except OSError:
            return RunResult(_failed(f"cannot resolve {parts.hostname}", retryable=True))
        literal = {_entry_host(entry) for entry in allowed}
        for address in addresses:
            if _private(address) and address not in literal:
                return RunResult(
                    tool_error(denied, f"{parts.hostname} resolves to a private address")
                )
        # Connect to the address just checked, not to a second resolution of the name, so a
        # name cannot be re-pointed at a private address between the check and the request.
        address = addresses[0]
        host_in_url = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{host_in_url}:{port}").geturl()
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        cap = min(self._max_bytes, call.tool.policy.max_output_bytes or DEFAULT_MAX_OUTPUT)
        body = bytearray()
        try:
            async with (
                httpx.AsyncClient(
                    timeout=call.timeout, follow_redirects=False, trust_env=False
                ) as client,
                client.stream(
                    "GET",
                    target,
                    headers={"Host": host_header},
                    extensions={"sni_hostname": parts.hostname},
                ) as response,
            ):
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > cap:
                        break
                status = response.status_code
                content_type = response.headers.get("content-type", "")
        except httpx.HTTPError as error:
            return RunResult(_failed(f"the request failed: {type(error).__name__}", retryable=True))
        truncated = len(body) > cap
        text = bytes(body[:cap]).decode("utf-8", errors="replace")
        return RunResult(
            _output(
                {
                    "status": status,
                    "content_type": content_type,
                    "body": text,
                    "truncated": truncated,
                }
            )
        )


def http_fetch_schema() -> dict[str, Any]:
    """The argument schema an ``http_fetch`` registration should use."""
    return {
        "type": "object",
        "properties": {"url": {"type": "string", "minLength": 1, "maxLength": 2048}},
        "required": ["url"],
        "additionalProperties": False,
    }
