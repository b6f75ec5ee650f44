"""Registry use cases: register, update, deregister, read, list and export tools."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from foredeck.common.v1 import tool_pb2 as common_tool_pb2
from foredeck.toolrunner.v1 import tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck_kit.principal import Principal
from foredeck_toolrunner.domain import permissions
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.ports import RegistryOp, RegistryRace, RegistryStore
from foredeck_toolrunner.domain.validation import (
    Limits,
    check_name,
    check_request_id,
    check_request_size,
    validate_tool,
)

__all__ = ["RegistryRace", "RemoteCheck", "ToolRegistry", "request_fingerprint"]

RemoteCheck = Callable[[tool_pb2.Tool], Awaitable[None]]
"""Checks that a tool's gRPC host or MCP server offers it (raises a ToolRunnerError if not)."""

_RACE_RETRIES = 8


def request_fingerprint(message: Any) -> str:
    """A digest of a request, so a reused request id with other content is told apart."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def _clean(tool: tool_pb2.Tool) -> tool_pb2.Tool:
    copy = tool_pb2.Tool()
    copy.CopyFrom(tool)
    copy.ClearField("version")
    copy.ClearField("create_time")
    copy.ClearField("update_time")
    copy.ClearField("created_by")
    copy.ClearField("updated_by")
    copy.ClearField("etag")
    return copy


_RUNTIMES = ("builtin", "grpc_host", "mcp_server")
_DEFINITION_PATHS = ("definition.description", "definition.parameters_json_schema")


def stamp(tool: tool_pb2.Tool) -> None:
    """Set the tool's etag: opaque, different for every version ever written."""
    seed = f"{tool.definition.name}\0{tool.version}\0{tool.update_time.ToJsonString()}"
    tool.etag = hashlib.sha256(seed.encode()).hexdigest()[:24]


def _policy_fields() -> frozenset[str]:
    return frozenset(f.name for f in tool_pb2.ToolPolicy.DESCRIPTOR.fields)


def _known_path(path: str) -> bool:
    if path in ("*", "policy", "output_json_schema", *_RUNTIMES, *_DEFINITION_PATHS):
        return True
    head, _, rest = path.partition(".")
    return head == "policy" and rest in _policy_fields()


def _mask_paths(request: svc.UpdateToolRequest) -> list[str]:
    """The mask's paths, or (empty mask) every field the request populates (AIP-134)."""
    if request.update_mask.paths:
        return list(request.update_mask.paths)
    tool = request.tool
    paths = [path for path in _DEFINITION_PATHS if getattr(tool.definition, path.split(".")[1])]
    paths += [f"policy.{field.name}" for field, _ in tool.policy.ListFields()]
    if tool.output_json_schema:
        paths.append("output_json_schema")
    runtime = tool.WhichOneof("runtime")
    if runtime is not None:
        paths.append(runtime)
    return paths


def apply_mask(current: tool_pb2.Tool, given: tool_pb2.Tool, paths: Sequence[str]) -> tool_pb2.Tool:
    """The current tool with the masked fields taken from ``given`` (``*``: all of them)."""
    result = tool_pb2.Tool()
    result.CopyFrom(current)
    if "*" in paths:
        result.CopyFrom(given)
        result.definition.name = current.definition.name
        return result
    for path in paths:
        if path in _DEFINITION_PATHS:
            field = path.split(".")[1]
            setattr(result.definition, field, getattr(given.definition, field))
        elif path == "output_json_schema":
            result.output_json_schema = given.output_json_schema
        elif path == "policy":
            result.policy.CopyFrom(given.policy)
        elif path in _RUNTIMES:
            getattr(result, path).CopyFrom(getattr(given, path))
        else:
            field = path.partition(".")[2]
            value = getattr(given.policy, field)
            if hasattr(value, "CopyFrom"):
                # A message field: copied whole, or cleared when the request leaves it unset.
                result.policy.ClearField(field)  # type: ignore[arg-type]
                if given.policy.HasField(field):  # type: ignore[arg-type]
                    getattr(result.policy, field).CopyFrom(value)
            elif hasattr(value, "extend"):
                target = getattr(result.policy, field)
                del target[:]
                target.extend(value)
            else:
                setattr(result.policy, field, value)
    return result


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PageQuery:
    """A decoded page token: where the page starts and which query it belongs to."""

    after: str
    query: str


def _query_digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def encode_page_token(after: str, query: str) -> str:
    """An opaque token for the page after ``after`` of ``query``."""
    raw = json.dumps({"a": after, "q": query}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: str) -> str:
    """The name a page starts after; PAGE_TOKEN_INVALID for a bad or foreign token."""
    if not token:
        return ""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after, token_query = data["a"], data["q"]
    except (ValueError, KeyError, TypeError):
        raise ToolRunnerError.page_token_invalid() from None
    if token_query != query or not isinstance(after, str):
        raise ToolRunnerError.page_token_invalid()
    return after


class ToolRegistry:
    """The registry's rules over a :class:`RegistryStore`."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        limits: Limits,
        builtins: Iterable[str],
        sandboxed_builtins: Iterable[str],
        remote_check: RemoteCheck,
        request_ttl: timedelta,
    ) -> None:
        self._store = store
        self._limits = limits
        self._builtins = tuple(builtins)
        self._sandboxed = tuple(sandboxed_builtins)
        self._remote_check = remote_check
        self._request_ttl = request_ttl

    @property
    def store(self) -> RegistryStore:
        """The storage behind the registry."""
        return self._store

    def _request_key(self, rpc: str, principal: Principal, request_id: str) -> str:
        return f"{rpc}|{principal.tenant_id}|{principal.user_id}|{request_id}"

    async def validate_local(self, tool: tool_pb2.Tool) -> None:
        """Validate a registration's content without contacting any server."""
        validate_tool(tool, self._limits, self._builtins, sandboxed=self._sandboxed)

    async def validate(self, tool: tool_pb2.Tool) -> None:
        """Validate a registration's content, runtime checks included."""
        validate_tool(tool, self._limits, self._builtins, sandboxed=self._sandboxed)
        if tool.WhichOneof("runtime") in ("grpc_host", "mcp_server"):
            await self._remote_check(tool)

    async def register(
        self, principal: Principal, request: svc.RegisterToolRequest
    ) -> tool_pb2.Tool:
        """Add a new tool at the version after the name's last one."""
        permissions.require_registry_write(principal, "RegisterTool")
        check_request_size(request.ByteSize())
        bad = check_request_id(request.request_id)
        if bad:
            raise ToolRunnerError.invalid_request(bad)
        fingerprint = request_fingerprint(request)
        key = self._request_key("register", principal, request.request_id)
        recorded = await self._store.recorded(key, fingerprint)
        if recorded is not None:
            return tool_pb2.Tool.FromString(recorded)
        tool = _clean(request.tool)
        await self.validate(tool)
        name = tool.definition.name
        for _ in range(_RACE_RETRIES):
            current, current_version = await self._store.get(name)
            if current is not None:
                raise ToolRunnerError.tool_already_exists(name, current_version)
            last = await self._store.last_version(name)
            now = _now()
            tool.version = last + 1
            tool.create_time.FromDatetime(now)
            tool.update_time.FromDatetime(now)
            tool.created_by = tool.updated_by = principal.user_id
            stamp(tool)
            if request.validate_only:
                return tool
            op = RegistryOp("create", name, expected_last=last, tool=tool)
            try:
                stored = await self._store.apply(
                    [op],
                    request_key=key,
                    fingerprint=fingerprint,
                    response=tool.SerializeToString(),
                    ttl=self._request_ttl,
                )
            except RegistryRace:
                continue
            return tool_pb2.Tool.FromString(stored)
        raise ToolRunnerError.etag_mismatch(name, "", 0)

    async def update(self, principal: Principal, request: svc.UpdateToolRequest) -> tool_pb2.Tool:
        """Change the fields the mask names as the tool's next version (AIP-134 semantics)."""
        permissions.require_registry_write(principal, "UpdateTool")
        check_request_size(request.ByteSize())
        bad = check_request_id(request.request_id)
        name = request.tool.definition.name
        bad += check_name(name, "tool.definition.name")
        paths = _mask_paths(request)
        bad += [("update_mask", f"unknown path {p[:80]!r}") for p in paths if not _known_path(p)]
        if bad:
            raise ToolRunnerError.invalid_request(bad)
        fingerprint = request_fingerprint(request)
        key = self._request_key("update", principal, request.request_id)
        recorded = await self._store.recorded(key, fingerprint)
        if recorded is not None:
            return tool_pb2.Tool.FromString(recorded)
        for _ in range(_RACE_RETRIES):
            current, current_version = await self._store.get(name)
            if current is None:
                raise ToolRunnerError.tool_not_found(name)
            if request.etag and request.etag != current.etag:
                raise ToolRunnerError.etag_mismatch(name, request.etag, current_version)
            tool = apply_mask(current, _clean(request.tool), paths)
            await self.validate(tool)
            tool.version = current_version + 1
            tool.create_time.CopyFrom(current.create_time)
            tool.created_by = current.created_by
            tool.update_time.FromDatetime(_now())
            tool.updated_by = principal.user_id
            stamp(tool)
            if request.validate_only:
                return tool
            op = RegistryOp("update", name, expected_current=current_version, tool=tool)
            try:
                stored = await self._store.apply(
                    [op],
                    request_key=key,
                    fingerprint=fingerprint,
                    response=tool.SerializeToString(),
                    ttl=self._request_ttl,
                )
            except ToolRunnerError as error:
                if error.reason != "ETAG_MISMATCH":
                    raise
                if request.etag:
                    raise ToolRunnerError.etag_mismatch(
                        name, request.etag, int(error.metadata.get("currentVersion", "0"))
                    ) from None
                continue  # unconditional: apply the mask to the newer version
            return tool_pb2.Tool.FromString(stored)
        raise ToolRunnerError.etag_mismatch(name, request.etag, 0)

    async def deregister(
        self, principal: Principal, request: svc.DeregisterToolRequest
    ) -> tool_pb2.Tool:
        """Remove a tool and all its versions."""
        permissions.require_registry_write(principal, "DeregisterTool")
        bad = check_request_id(request.request_id)
        bad += check_name(request.tool_name, "tool_name")
        if bad:
            raise ToolRunnerError.invalid_request(bad)
        fingerprint = request_fingerprint(request)
        key = self._request_key("deregister", principal, request.request_id)
        recorded = await self._store.recorded(key, fingerprint)
        if recorded is not None:
            return tool_pb2.Tool.FromString(recorded)
        for _ in range(_RACE_RETRIES):
            current, current_version = await self._store.get(request.tool_name)
            if current is None:
                raise ToolRunnerError.tool_not_found(request.tool_name)
            if request.etag and request.etag != current.etag:
                raise ToolRunnerError.etag_mismatch(
                    request.tool_name, request.etag, current_version
                )
            op = RegistryOp("delete", request.tool_name, expected_current=current_version)
            try:
                stored = await self._store.apply(
                    [op],
                    request_key=key,
                    fingerprint=fingerprint,
                    response=current.SerializeToString(),
                    ttl=self._request_ttl,
                )
            except ToolRunnerError as error:
                if error.reason != "ETAG_MISMATCH" or request.etag:
                    raise
                continue
            return tool_pb2.Tool.FromString(stored)
        raise ToolRunnerError.etag_mismatch(request.tool_name, request.etag, 0)

    async def lookup(self, principal: Principal, name: str, version: int) -> tool_pb2.Tool:
        """The tool a caller may run, checked in the contract's order.

        ``tools:<name>`` before the lookup (so nothing is revealed), then existence and
        version, then the tool's own required permissions.
        """
        bad = check_name(name, "tool_name")
        if version < 0:
            bad.append(("version", "must be 0 or a version"))
        if bad:
            raise ToolRunnerError.invalid_request(bad)
        reader = permissions.is_registry_reader(principal)
        name_permission = permissions.tool_permission(name)
        if not permissions.has(principal, name_permission) and not reader:
            raise ToolRunnerError.tool_permission_denied(name, name_permission)
        tool, current_version = await self._store.get(name, version)
        if current_version == 0:
            raise ToolRunnerError.tool_not_found(name)
        if tool is None:
            raise ToolRunnerError.tool_version_not_found(name, version, current_version)
        return tool

    async def get(self, principal: Principal, request: svc.GetToolRequest) -> tool_pb2.Tool:
        """One tool, for a caller that may run it or holds a registry permission."""
        tool = await self.lookup(principal, request.tool_name, request.version)
        if not permissions.is_registry_reader(principal):
            missing = permissions.missing_tool_permission(principal, tool)
            if missing is not None:
                raise ToolRunnerError.tool_permission_denied(request.tool_name, missing)
        return tool

    async def _visible(
        self,
        principal: Principal,
        prefix: str,
        after: str,
        page_size: int,
        *,
        everything: bool,
        names: frozenset[str] = frozenset(),
    ) -> tuple[list[tool_pb2.Tool], bool]:
        page: list[tool_pb2.Tool] = []
        batch = max(page_size, 50)
        while True:
            tools = await self._store.list_current(prefix, after, batch)
            for tool in tools:
                after = tool.definition.name
                if names and tool.definition.name not in names:
                    continue
                if everything or permissions.can_run(principal, tool):
                    page.append(tool)
                    if len(page) == page_size:
                        more = await self._store.list_current(prefix, after, 1)
                        return page, bool(more)
            if len(tools) < batch:
                return page, False

    @staticmethod
    def _page_args(page_size: int, default: int, maximum: int, prefix: str) -> int:
        bad: list[tuple[str, str]] = []
        if page_size < 0:
            bad.append(("page_size", "must not be negative"))
        if len(prefix) > 64:
            bad.append(("name_prefix", "at most 64 characters"))
        if bad:
            raise ToolRunnerError.invalid_request(bad)
        return min(page_size or default, maximum)

    async def list_page(
        self, principal: Principal, request: svc.ListToolsRequest
    ) -> tuple[list[tool_pb2.Tool], str]:
        """A page of the tools the caller may run (all of them for registry readers)."""
        size = self._page_args(request.page_size, 50, 500, request.name_prefix)
        query = _query_digest("list", request.name_prefix)
        after = decode_page_token(request.page_token, query)
        tools, more = await self._visible(
            principal,
            request.name_prefix,
            after,
            size,
            everything=permissions.is_registry_reader(principal),
        )
        token = encode_page_token(tools[-1].definition.name, query) if more and tools else ""
        return tools, token

    async def export_page(
        self, principal: Principal, request: svc.ExportToolSchemasRequest
    ) -> tuple[list[tool_pb2.Tool], str]:
        """A page of the tools the caller may run, for rendering as model-facing definitions."""
        size = self._page_args(request.page_size, 100, 500, request.name_prefix)
        bad: list[tuple[str, str]] = []
        if len(request.tool_names) > 128:
            bad.append(("tool_names", "at most 128 names"))
        if request.format not in svc.ToolSchemaFormat.values():
            bad.append(("format", "unknown value"))
        if bad:
            raise ToolRunnerError.invalid_request(bad)
        names = sorted(set(request.tool_names))
        query = _query_digest("export", request.name_prefix, *names)
        after = decode_page_token(request.page_token, query)
        tools, more = await self._visible(
            principal,
            request.name_prefix,
            after,
            size,
            everything=False,
            names=frozenset(names),
        )
        token = encode_page_token(tools[-1].definition.name, query) if more and tools else ""
        return tools, token

    async def ensure(self, tools: Sequence[tool_pb2.Tool], user: str) -> None:
        """Register each tool whose name is free (built-ins at start); never overwrites."""
        for tool in tools:
            current, _ = await self._store.get(tool.definition.name)
            if current is not None:
                continue
            last = await self._store.last_version(tool.definition.name)
            stored = _clean(tool)
            validate_tool(stored, self._limits, self._builtins, sandboxed=self._sandboxed)
            now = _now()
            stored.version = last + 1
            stored.create_time.FromDatetime(now)
            stored.update_time.FromDatetime(now)
            stored.created_by = stored.updated_by = user
            stamp(stored)
            op = RegistryOp("create", stored.definition.name, expected_last=last, tool=stored)
            try:
                await self._store.apply(
                    [op],
                    request_key="",
                    fingerprint="",
                    response=b"",
                    ttl=self._request_ttl,
                )
            except (RegistryRace, ToolRunnerError):
                continue


def definitions(tools: Iterable[tool_pb2.Tool]) -> list[common_tool_pb2.ToolDefinition]:
    """The model-facing definitions of ``tools``."""
    return [tool.definition for tool in tools]


def render(tools: Sequence[tool_pb2.Tool], fmt: int) -> str:
    """Render tool definitions as JSON text in a provider's tool format."""
    if fmt == svc.TOOL_SCHEMA_FORMAT_UNSPECIFIED:
        return ""
    items = [
        (
            t.definition.name,
            t.definition.description,
            json.loads(t.definition.parameters_json_schema),
        )
        for t in tools
    ]
    document: Any
    if fmt == svc.TOOL_SCHEMA_FORMAT_JSON_SCHEMA:
        document = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$defs": {name: {**schema, "description": desc} for name, desc, schema in items},
        }
    elif fmt == svc.TOOL_SCHEMA_FORMAT_OPENAI:
        document = [
            {
                "type": "function",
                "function": {"name": name, "description": desc, "parameters": schema},
            }
            for name, desc, schema in items
        ]
    elif fmt == svc.TOOL_SCHEMA_FORMAT_ANTHROPIC:
        document = [
            {"name": name, "description": desc, "input_schema": schema}
            for name, desc, schema in items
        ]
    else:
        document = [
            {"name": name, "description": desc, "inputSchema": schema}
            for name, desc, schema in items
        ]
    return json.dumps(document, separators=(",", ":"), sort_keys=True)
