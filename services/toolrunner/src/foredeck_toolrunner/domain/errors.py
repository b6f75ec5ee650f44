"""Typed errors of the tool runner's domain, one factory per reason of ``ErrorReason``.

The domain does not import grpc, so an error names its status code by the canonical code's
name; :mod:`foredeck_toolrunner.errors` turns it into the kit's ``ServiceError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta

__all__ = ["ToolRunnerError"]


class ToolRunnerError(Exception):
    """A failure the service returns on purpose: code name, reason, message and details."""

    def __init__(
        self,
        code: str,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        retry_after: timedelta | None = None,
        quota_violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_after = retry_after
        self.quota_violations = list(quota_violations)

    def __repr__(self) -> str:
        return f"ToolRunnerError({self.code}, {self.reason}, {self.message!r})"

    @classmethod
    def invalid_request(cls, violations: Iterable[tuple[str, str]]) -> ToolRunnerError:
        """Request fields are malformed or out of range, one violation per field."""
        return cls(
            "INVALID_ARGUMENT", "INVALID_REQUEST", "invalid request", field_violations=violations
        )

    @classmethod
    def request_too_large(cls, field: str, limit: int, actual: int) -> ToolRunnerError:
        """A field is over its documented size limit."""
        return cls(
            "INVALID_ARGUMENT",
            "REQUEST_TOO_LARGE",
            f"{field} is over its size limit",
            metadata={"field": field, "limit": str(limit), "actual": str(actual)},
            field_violations=[(field, f"size {actual} is over the limit of {limit}")],
        )

    @classmethod
    def permission_missing(cls, permission: str) -> ToolRunnerError:
        """The caller lacks a permission the RPC itself requires."""
        return cls(
            "PERMISSION_DENIED",
            "PERMISSION_MISSING",
            f"permission {permission!r} required",
            metadata={"permission": permission},
        )

    @classmethod
    def tool_permission_denied(cls, tool_name: str, permission: str) -> ToolRunnerError:
        """The caller may not see or run this tool (whether or not it exists)."""
        return cls(
            "PERMISSION_DENIED",
            "TOOL_PERMISSION_DENIED",
            "the caller may not use this tool",
            metadata={"toolName": tool_name, "permission": permission},
        )

    @classmethod
    def tool_not_found(cls, tool_name: str) -> ToolRunnerError:
        """No tool has this name."""
        return cls("NOT_FOUND", "TOOL_NOT_FOUND", "no such tool", metadata={"toolName": tool_name})

    @classmethod
    def tool_version_not_found(cls, tool_name: str, version: int, current: int) -> ToolRunnerError:
        """The tool exists but not at the requested version."""
        return cls(
            "NOT_FOUND",
            "TOOL_VERSION_NOT_FOUND",
            "no such tool version",
            metadata={
                "toolName": tool_name,
                "version": str(version),
                "currentVersion": str(current),
            },
        )

    @classmethod
    def tool_already_exists(cls, tool_name: str, version: int) -> ToolRunnerError:
        """A tool with this name is registered already."""
        return cls(
            "ALREADY_EXISTS",
            "TOOL_ALREADY_EXISTS",
            "a tool with this name is already registered",
            metadata={"toolName": tool_name, "version": str(version)},
        )

    @classmethod
    def etag_mismatch(cls, tool_name: str, etag: str, current: int) -> ToolRunnerError:
        """The etag sent is no longer the tool's: someone else changed it first."""
        return cls(
            "ABORTED",
            "ETAG_MISMATCH",
            "the tool was changed by someone else; read it again",
            metadata={"toolName": tool_name, "etag": etag[:128], "currentVersion": str(current)},
        )

    @classmethod
    def delegation_not_allowed(cls, method: str, run_id: str) -> ToolRunnerError:
        """A run's principal named another run."""
        return cls(
            "PERMISSION_DENIED",
            "DELEGATION_NOT_ALLOWED",
            "a run's principal may act only for its own run",
            metadata={"method": method, "runId": run_id},
        )

    @classmethod
    def arguments_invalid(
        cls, tool_name: str, violations: Iterable[tuple[str, str]]
    ) -> ToolRunnerError:
        """The call's arguments do not satisfy the tool's schema."""
        return cls(
            "INVALID_ARGUMENT",
            "TOOL_ARGUMENTS_INVALID",
            "the arguments do not satisfy the tool's schema",
            metadata={"toolName": tool_name},
            field_violations=violations,
        )

    @classmethod
    def schema_invalid(
        cls, tool_name: str, violations: Iterable[tuple[str, str]]
    ) -> ToolRunnerError:
        """A schema in a registration is not a valid JSON Schema."""
        return cls(
            "INVALID_ARGUMENT",
            "TOOL_SCHEMA_INVALID",
            "a schema is not a valid JSON Schema",
            metadata={"toolName": tool_name},
            field_violations=violations,
        )

    @classmethod
    def rate_limited(
        cls, tool_name: str, max_calls: int, window_seconds: float, retry_after: timedelta
    ) -> ToolRunnerError:
        """The tenant used up the tool's rate limit for the current window."""
        window = f"{window_seconds:g}"
        return cls(
            "RESOURCE_EXHAUSTED",
            "TOOL_RATE_LIMITED",
            "the tool's rate limit is used up; retry later",
            metadata={"toolName": tool_name, "maxCalls": str(max_calls), "windowSeconds": window},
            retry_after=retry_after,
            quota_violations=[
                (f"tool:{tool_name}", f"at most {max_calls} calls per {window} s per tenant")
            ],
        )

    @classmethod
    def tool_timeout(cls, tool_name: str, *, waiting: bool) -> ToolRunnerError:
        """The caller's deadline ran out before the tool finished (or while waiting for it)."""
        return cls(
            "DEADLINE_EXCEEDED",
            "TOOL_TIMEOUT",
            "the deadline ran out before the tool finished",
            metadata={"toolName": tool_name, "waitingForIdempotencyKey": str(waiting).lower()},
        )

    @classmethod
    def deadline_too_short(cls, minimum: timedelta) -> ToolRunnerError:
        """The deadline was spent, or too short to start, when the request arrived."""
        return cls(
            "DEADLINE_EXCEEDED",
            "DEADLINE_TOO_SHORT",
            "deadline too short",
            metadata={"minimumSeconds": f"{minimum.total_seconds():g}"},
        )

    @classmethod
    def tool_host_unavailable(
        cls, tool_name: str, target: str, upstream_code: str
    ) -> ToolRunnerError:
        """The gRPC tool host could not be reached or is overloaded."""
        return cls(
            "UNAVAILABLE",
            "TOOL_HOST_UNAVAILABLE",
            "the tool host is unavailable",
            metadata={"toolName": tool_name, "target": target, "upstreamCode": upstream_code},
            retry_after=timedelta(seconds=1),
        )

    @classmethod
    def mcp_unavailable(cls, tool_name: str, server: str) -> ToolRunnerError:
        """The MCP server could not be started or reached."""
        return cls(
            "UNAVAILABLE",
            "MCP_SERVER_UNAVAILABLE",
            "the MCP server is unavailable",
            metadata={"toolName": tool_name, "server": server},
            retry_after=timedelta(seconds=1),
        )

    @classmethod
    def mcp_protocol_error(cls, server: str) -> ToolRunnerError:
        """The MCP server answered but broke the protocol during an import."""
        return cls(
            "FAILED_PRECONDITION",
            "MCP_SERVER_PROTOCOL_ERROR",
            "the MCP server broke the protocol",
            metadata={"server": server},
        )

    @classmethod
    def sandbox_unavailable(cls, tool_name: str) -> ToolRunnerError:
        """No sandbox could be started for the call."""
        return cls(
            "UNAVAILABLE",
            "SANDBOX_UNAVAILABLE",
            "no sandbox could be started",
            metadata={"toolName": tool_name},
            retry_after=timedelta(seconds=1),
        )

    @classmethod
    def idempotency_key_reused(cls, key: str, tool_name: str) -> ToolRunnerError:
        """The idempotency key was used for a different call."""
        return cls(
            "FAILED_PRECONDITION",
            "IDEMPOTENCY_KEY_REUSED",
            "the idempotency key was already used for a different call",
            metadata={"idempotencyKey": key, "toolName": tool_name},
        )

    @classmethod
    def approval_required(cls, tool_name: str) -> ToolRunnerError:
        """The tool needs a person's approval and the call carried none."""
        return cls(
            "FAILED_PRECONDITION",
            "APPROVAL_REQUIRED",
            "the tool requires approval",
            metadata={"toolName": tool_name},
        )

    @classmethod
    def approval_invalid(cls, tool_name: str) -> ToolRunnerError:
        """The approval token is not valid for this call."""
        return cls(
            "PERMISSION_DENIED",
            "APPROVAL_INVALID",
            "approval token not valid for this call",
            metadata={"toolName": tool_name, "check": "signature"},
        )

    @classmethod
    def request_id_reused(cls, request_id: str) -> ToolRunnerError:
        """A registry request id came back with a different request."""
        return cls(
            "FAILED_PRECONDITION",
            "REQUEST_ID_REUSED",
            "request_id was already used for a different request",
            metadata={"requestId": request_id},
        )

    @classmethod
    def page_token_invalid(cls) -> ToolRunnerError:
        """A page token is malformed or from another query."""
        return cls(
            "INVALID_ARGUMENT",
            "PAGE_TOKEN_INVALID",
            "invalid page token; restart from the first page",
            field_violations=[("page_token", "malformed, expired or from a different request")],
        )

    @classmethod
    def builtin_unknown(cls, name: str, known: Iterable[str]) -> ToolRunnerError:
        """A registration names a built-in that does not exist."""
        return cls(
            "INVALID_ARGUMENT",
            "BUILTIN_TOOL_UNKNOWN",
            "no such built-in tool",
            metadata={"builtinName": name, "knownBuiltins": ",".join(sorted(known))},
            field_violations=[("tool.builtin.builtin_name", "not a built-in of this runner")],
        )

    @classmethod
    def remote_tool_not_found(cls, tool_name: str, remote: str, target: str) -> ToolRunnerError:
        """The host or MCP server does not offer the tool."""
        return cls(
            "FAILED_PRECONDITION",
            "REMOTE_TOOL_NOT_FOUND",
            "the remote server does not offer this tool",
            metadata={"toolName": tool_name, "remoteToolName": remote, "target": target},
        )

    @classmethod
    def store_unavailable(cls) -> ToolRunnerError:
        """Redis could not be reached."""
        return cls(
            "UNAVAILABLE",
            "STORE_UNAVAILABLE",
            "redis unavailable",
            metadata={"store": "redis"},
            retry_after=timedelta(seconds=1),
        )
