"""Checks on registrations and on call arguments: names, sizes, ranges and JSON Schemas."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import timedelta
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError, ValidationError

from foredeck.toolrunner.v1 import tool_pb2
from foredeck_toolrunner.domain.errors import ToolRunnerError

__all__ = [
    "MAX_ARGUMENTS_BYTES",
    "MAX_SCHEMA_BYTES",
    "TOOL_NAME",
    "Limits",
    "check_name",
    "check_request_id",
    "load_arguments",
    "parameters_validator",
    "schema_violations",
    "validate_arguments",
    "validate_tool",
]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
MAX_ARGUMENTS_BYTES = MIB
MAX_SCHEMA_BYTES = 64 * KIB
MAX_DESCRIPTION_BYTES = 4 * KIB
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
REQUEST_ID = re.compile(r"^[a-zA-Z0-9_.:-]{1,128}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}$")


class Limits:
    """Ceilings a registration's resource limits may not exceed (from the settings)."""

    def __init__(self, max_memory_bytes: int, max_cpu_seconds: float) -> None:
        self.max_memory_bytes = max_memory_bytes
        self.max_cpu_seconds = max_cpu_seconds


def check_name(name: str, field: str) -> list[tuple[str, str]]:
    """Violations of the tool-name rule (1-64 characters of ``[a-zA-Z0-9_-]``)."""
    if not TOOL_NAME.fullmatch(name):
        return [(field, "must be 1-64 characters of [a-zA-Z0-9_-]")]
    return []


MAX_REGISTRY_REQUEST_BYTES = MIB


def check_request_size(size: int) -> None:
    """Raise REQUEST_TOO_LARGE for a registry write over 1 MiB."""
    if size > MAX_REGISTRY_REQUEST_BYTES:
        raise ToolRunnerError.request_too_large("request", MAX_REGISTRY_REQUEST_BYTES, size)


def check_request_id(request_id: str) -> list[tuple[str, str]]:
    """Violations of the request-id rule (1-128 characters of ``[a-zA-Z0-9_.:-]``)."""
    if not REQUEST_ID.fullmatch(request_id):
        return [("request_id", "required: 1-128 characters of [a-zA-Z0-9_.:-]")]
    return []


def schema_violations(
    text: str, field: str, *, require_object: bool, required: bool
) -> list[tuple[str, str]]:
    """Why ``text`` is not a usable JSON Schema (draft 2020-12), as field violations."""
    if not text:
        return [(field, "required: a JSON Schema")] if required else []
    size = len(text.encode())
    if size > MAX_SCHEMA_BYTES:
        return [(field, f"size {size} is over the limit of {MAX_SCHEMA_BYTES}")]
    try:
        schema = json.loads(text)
    except ValueError:
        return [(field, "not valid JSON")]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        return [(field, f"not a valid JSON Schema: {error.message}"[:512])]
    if require_object and not (isinstance(schema, dict) and schema.get("type") == "object"):
        return [(field, 'the top-level type must be "object"')]
    return []


def _duration(value: Any) -> timedelta:
    return timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def _policy_violations(policy: tool_pb2.ToolPolicy, limits: Limits) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    base = "tool.policy"
    perms = list(policy.required_permissions)
    if len(perms) > 16:
        bad.append((f"{base}.required_permissions", "at most 16 permissions"))
    for i, perm in enumerate(perms):
        if not 1 <= len(perm) <= 128:
            bad.append((f"{base}.required_permissions[{i}]", "must be 1-128 characters"))
    if policy.HasField("rate_limit"):
        rate = policy.rate_limit
        if not 1 <= rate.max_calls <= 1_000_000:
            bad.append((f"{base}.rate_limit.max_calls", "must be 1-1000000"))
        window = _duration(rate.window)
        if not timedelta(seconds=1) <= window <= timedelta(days=1):
            bad.append((f"{base}.rate_limit.window", "must be 1 second to 1 day"))
    if policy.HasField("timeout"):
        timeout = _duration(policy.timeout)
        if not timedelta(milliseconds=10) <= timeout <= timedelta(minutes=15):
            bad.append((f"{base}.timeout", "must be 10 ms to 15 minutes"))
    if policy.max_output_bytes and not KIB <= policy.max_output_bytes <= 16 * MIB:
        bad.append((f"{base}.max_output_bytes", "must be 0 or 1 KiB to 16 MiB"))
    if policy.output_overflow not in tool_pb2.OutputOverflow.values():
        bad.append((f"{base}.output_overflow", "unknown value"))
    if policy.HasField("network"):
        net = policy.network
        if net.access not in tool_pb2.NetworkAccess.values():
            bad.append((f"{base}.network.access", "unknown value"))
        if len(net.allowed_hosts) > 64:
            bad.append((f"{base}.network.allowed_hosts", "at most 64 entries"))
        for i, host in enumerate(net.allowed_hosts):
            if not 1 <= len(host) <= 253 or any(c in host for c in "/ @?#"):
                bad.append((f"{base}.network.allowed_hosts[{i}]", "must be host or host:port"))
        if net.access == tool_pb2.NETWORK_ACCESS_ALLOWLIST and not net.allowed_hosts:
            bad.append((f"{base}.network.allowed_hosts", "an allowlist needs at least one host"))
    if policy.HasField("filesystem"):
        fs = policy.filesystem
        if len(fs.read_only_paths) > 32:
            bad.append((f"{base}.filesystem.read_only_paths", "at most 32 paths"))
        for i, path in enumerate(fs.read_only_paths):
            if not path.startswith("/") or len(path) > 4096 or "\0" in path:
                bad.append((f"{base}.filesystem.read_only_paths[{i}]", "must be an absolute path"))
            elif ".." in path.split("/"):
                bad.append((f"{base}.filesystem.read_only_paths[{i}]", "must not contain '..'"))
        if not 0 <= fs.work_dir_max_bytes <= GIB:
            bad.append((f"{base}.filesystem.work_dir_max_bytes", "must be 0 to 1 GiB"))
    if policy.HasField("resource_limits"):
        rl = policy.resource_limits
        rb = f"{base}.resource_limits"
        if rl.memory_bytes and not (
            16 * MIB <= rl.memory_bytes <= min(16 * GIB, limits.max_memory_bytes)
        ):
            bad.append((f"{rb}.memory_bytes", "must be 16 MiB to the runner's ceiling"))
        if rl.HasField("cpu_time"):
            cpu = _duration(rl.cpu_time).total_seconds()
            if cpu and not 0.01 <= cpu <= min(900.0, limits.max_cpu_seconds):
                bad.append((f"{rb}.cpu_time", "must be 10 ms to the runner's ceiling"))
        if rl.max_processes and not 1 <= rl.max_processes <= 1024:
            bad.append((f"{rb}.max_processes", "must be 1-1024"))
        if rl.max_open_files and not 16 <= rl.max_open_files <= 65536:
            bad.append((f"{rb}.max_open_files", "must be 16-65536"))
        if not 0 <= rl.max_file_size_bytes <= GIB:
            bad.append((f"{rb}.max_file_size_bytes", "must be 0 to 1 GiB"))
    return bad


def _runtime_violations(tool: tool_pb2.Tool) -> list[tuple[str, str]]:
    kind = tool.WhichOneof("runtime")
    if kind is None:
        return [
            ("tool.runtime", "exactly one runtime (builtin, grpc_host, mcp_server) is required")
        ]
    bad: list[tuple[str, str]] = []
    if kind == "grpc_host":
        host = tool.grpc_host
        if not 1 <= len(host.target) <= 512:
            bad.append(("tool.grpc_host.target", "must be 1-512 characters"))
        if host.remote_tool_name:
            bad += check_name(host.remote_tool_name, "tool.grpc_host.remote_tool_name")
    elif kind == "mcp_server":
        bad += mcp_server_violations(tool.mcp_server.server, "tool.mcp_server.server")
        remote = tool.mcp_server.remote_tool_name
        if len(remote) > 128:
            bad.append(("tool.mcp_server.remote_tool_name", "at most 128 characters"))
    return bad


def mcp_server_violations(server: tool_pb2.McpServer, base: str) -> list[tuple[str, str]]:
    """Violations of an MCP server's transport description."""
    bad: list[tuple[str, str]] = []
    transport = server.WhichOneof("transport")
    if transport is None:
        return [(base, "exactly one transport (stdio, streamable_http) is required")]
    if transport == "stdio":
        stdio = server.stdio
        if not 1 <= len(stdio.command) <= 4096:
            bad.append((f"{base}.stdio.command", "must be 1-4096 characters"))
        if len(stdio.args) > 256 or any(len(a) > 4096 for a in stdio.args):
            bad.append((f"{base}.stdio.args", "at most 256 arguments of 4096 characters"))
        if len(stdio.env) > 64 or len(stdio.secret_env) > 64:
            bad.append((f"{base}.stdio.env", "at most 64 variables"))
        for name, value in [*stdio.env.items(), *stdio.secret_env.items()]:
            if not ENV_NAME.fullmatch(name) or len(value) > 4096:
                bad.append((f"{base}.stdio.env", f"bad variable {name[:64]!r}"))
    else:
        http = server.streamable_http
        url = http.url
        if not 1 <= len(url) <= 2048 or not url.startswith(("http://", "https://")):
            bad.append((f"{base}.streamable_http.url", "must be an http(s) URL"))
        if len(http.headers) > 32 or len(http.secret_headers) > 32:
            bad.append((f"{base}.streamable_http.headers", "at most 32 headers"))
        for name, value in [*http.headers.items(), *http.secret_headers.items()]:
            if not HEADER_NAME.fullmatch(name) or len(value) > 4096:
                bad.append((f"{base}.streamable_http.headers", f"bad header {name[:64]!r}"))
    return bad


def validate_tool(
    tool: tool_pb2.Tool, limits: Limits, builtins: Iterable[str], *, sandboxed: Iterable[str]
) -> None:
    """Raise the first applicable error for a registration that is not acceptable.

    Request violations are reported together (INVALID_REQUEST); schema problems as
    TOOL_SCHEMA_INVALID; an unknown built-in as BUILTIN_TOOL_UNKNOWN.
    """
    definition = tool.definition
    bad = check_name(definition.name, "tool.definition.name")
    description_size = len(definition.description.encode())
    if not 1 <= description_size <= MAX_DESCRIPTION_BYTES:
        bad.append(("tool.definition.description", "must be 1 character to 4 KiB"))
    bad += _policy_violations(tool.policy, limits)
    bad += _runtime_violations(tool)
    if tool.WhichOneof("runtime") == "builtin" and tool.builtin.builtin_name in set(sandboxed):
        access = tool.policy.network.access
        if access == tool_pb2.NETWORK_ACCESS_ALLOWLIST:
            bad.append(
                (
                    "tool.policy.network",
                    "sandboxed built-ins never get network access; use http_fetch",
                )
            )
    if bad:
        raise ToolRunnerError.invalid_request(bad)
    schema_bad = schema_violations(
        definition.parameters_json_schema,
        "tool.definition.parameters_json_schema",
        require_object=True,
        required=True,
    )
    schema_bad += schema_violations(
        tool.output_json_schema, "tool.output_json_schema", require_object=False, required=False
    )
    if schema_bad:
        raise ToolRunnerError.schema_invalid(definition.name, schema_bad)
    if tool.WhichOneof("runtime") == "builtin":
        known = set(builtins)
        if tool.builtin.builtin_name not in known:
            raise ToolRunnerError.builtin_unknown(tool.builtin.builtin_name, known)


@lru_cache(maxsize=1024)
def parameters_validator(schema_text: str) -> Draft202012Validator:
    """A validator for a registered (already checked) schema, cached by its text."""
    return Draft202012Validator(json.loads(schema_text), format_checker=FormatChecker())


def _pointer(path: Iterable[Any]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def load_arguments(tool_name: str, text: str) -> dict[str, Any]:
    """Parse the call's arguments, which must be the JSON text of an object."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        raise ToolRunnerError.arguments_invalid(
            tool_name, [("arguments_json", "not valid JSON")]
        ) from None
    if not isinstance(value, dict):
        raise ToolRunnerError.arguments_invalid(
            tool_name, [("arguments_json", "must be a JSON object")]
        )
    return value


def validate_arguments(tool_name: str, schema_text: str, arguments: dict[str, Any]) -> None:
    """Raise TOOL_ARGUMENTS_INVALID with one violation per bad value (by JSON Pointer)."""
    validator = parameters_validator(schema_text)
    violations: dict[str, str] = {}

    def add(error: ValidationError) -> None:
        required = error.validator_value
        if (
            error.validator == "required"
            and isinstance(error.instance, dict)
            and isinstance(required, list)
        ):
            for name in required:
                if name not in error.instance:
                    field = "arguments_json" + _pointer([*error.absolute_path, name])
                    violations.setdefault(field, "required property is missing")
            return
        if error.context and error.validator in ("anyOf", "oneOf"):
            # The best matching branch says more than "is not valid under any schema".
            field = "arguments_json" + _pointer(error.absolute_path)
            violations.setdefault(field, error.message[:512])
            return
        field = "arguments_json" + _pointer(error.absolute_path)
        violations.setdefault(field, error.message[:512])

    for error in validator.iter_errors(arguments):
        add(error)
    if violations:
        raise ToolRunnerError.arguments_invalid(tool_name, sorted(violations.items()))
