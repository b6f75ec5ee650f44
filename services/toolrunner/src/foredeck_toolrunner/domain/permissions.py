"""Who may see, run and change tools: the runner's permission rules in one place."""

from __future__ import annotations

from foredeck.toolrunner.v1 import tool_pb2
from foredeck_kit.principal import Principal
from foredeck_toolrunner.domain.errors import ToolRunnerError

__all__ = [
    "REGISTRY_READ",
    "REGISTRY_WRITE",
    "can_run",
    "has",
    "missing_tool_permission",
    "require_registry_write",
    "tool_permission",
]

REGISTRY_READ = "toolregistry:read"
REGISTRY_WRITE = "toolregistry:write"


def tool_permission(name: str) -> str:
    """The permission naming one tool, ``tools:<name>``."""
    return f"tools:{name}"


def has(principal: Principal, permission: str) -> bool:
    """Whether ``permission`` is granted; a granted value with a trailing ``*`` is a prefix."""
    if principal.has(permission):
        return True
    return any(
        granted.endswith("*") and permission.startswith(granted[:-1])
        for granted in principal.permissions
    )


def missing_tool_permission(principal: Principal, tool: tool_pb2.Tool) -> str | None:
    """The first permission the caller lacks to run ``tool``, or None when it may."""
    name_permission = tool_permission(tool.definition.name)
    if not has(principal, name_permission):
        return name_permission
    for permission in tool.policy.required_permissions:
        if not has(principal, permission):
            return permission
    return None


def can_run(principal: Principal, tool: tool_pb2.Tool) -> bool:
    """Whether the caller may see and run ``tool``."""
    return missing_tool_permission(principal, tool) is None


def is_registry_reader(principal: Principal) -> bool:
    """Whether the caller may see every tool (a registry permission)."""
    return has(principal, REGISTRY_READ) or has(principal, REGISTRY_WRITE)


_REGISTRY_SERVICE = "/foredeck.toolrunner.v1.ToolRegistryService/"


def require_registry_write(principal: Principal, method: str) -> None:
    """Raise unless the caller may change the registry: a gateway principal with the permission.

    A run's delegated principal is refused even when it holds ``toolregistry:write``, so no run
    can change the registry (checked here as well as by the principal verifier, so the rule
    holds whatever the kit's handler wrapper does).
    """
    if principal.delegated:
        raise ToolRunnerError.delegation_not_allowed(
            _REGISTRY_SERVICE + method, principal.run_id or ""
        )
    if not has(principal, REGISTRY_WRITE):
        raise ToolRunnerError.permission_missing(REGISTRY_WRITE)
