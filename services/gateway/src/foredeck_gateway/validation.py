"""Checks of request fields the gateway makes before anything is admitted or forwarded."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from foredeck.common.v1 import usage_pb2
from foredeck_gateway.errors import GatewayReason
from foredeck_kit.errors import ServiceError

__all__ = [
    "Violations",
    "check_budget",
    "check_labels",
    "check_page",
    "check_request_id",
]

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
TENANT = re.compile(r"^[a-z0-9_.-]{1,64}$")
USER = re.compile(r"^[A-Za-z0-9._@:-]{1,128}$")
PERMISSION = re.compile(r"^[a-z0-9_.:*-]{1,128}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
AGENT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
MAX_INPUT_BYTES = 256 * 1024
MAX_REASON_CHARS = 1024


class Violations:
    """Collects field violations and raises them together."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.too_large: ServiceError | None = None

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def size(self, field: str, limit: int, actual: int) -> None:
        if actual > limit and self.too_large is None:
            self.too_large = ServiceError.request_too_large(field, limit, actual)

    def raise_if_any(self) -> None:
        if self.too_large is not None:
            raise self.too_large
        if self.items:
            raise GatewayReason.invalid(self.items)


def check_request_id(v: Violations, value: str, field: str = "request_id") -> None:
    if not REQUEST_ID.fullmatch(value):
        v.add(field, "required: 1-64 characters of [A-Za-z0-9._:-]")


def check_id(v: Violations, value: str, field: str, pattern: re.Pattern[str] = ID) -> None:
    if not pattern.fullmatch(value):
        v.add(field, "required and well formed")


def check_page(v: Violations, page_size: int, default: int, maximum: int) -> int:
    if page_size < 0:
        v.add("page_size", "must not be negative")
        return default
    if page_size == 0:
        return default
    return min(page_size, maximum)


def check_labels(
    v: Violations, labels: Mapping[str, str], most: int, field: str = "labels"
) -> None:
    if len(labels) > most:
        v.add(field, f"at most {most} entries")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            v.add(f"{field}[{key[:32]}]", "key must be 1-63 characters of [a-z0-9_.-]")
        elif len(value) > 256:
            v.add(f"{field}[{key}]", "value is at most 256 characters")


def check_budget(budget: usage_pb2.Budget, field: str = "budget") -> None:
    """Raise BUDGET_INVALID for a negative cap."""
    bad: list[tuple[str, str]] = []
    for name in (
        "max_steps",
        "max_tokens",
        "max_cost_usd_micros",
        "max_sub_agent_depth",
        "max_sub_agents",
    ):
        if getattr(budget, name) < 0:
            bad.append((f"{field}.{name}", "must be zero or positive"))
    if budget.max_wall_time.seconds < 0 or budget.max_wall_time.nanos < 0:
        bad.append((f"{field}.max_wall_time", "must be zero or positive"))
    if bad:
        raise GatewayReason.budget_invalid(bad)


def check_input(v: Violations, text: str, field: str = "input") -> None:
    size = len(text.encode())
    if size == 0:
        v.add(field, "required: 1 byte to 256 KiB")
    v.size(field, MAX_INPUT_BYTES, size)


def check_text(v: Violations, text: str, field: str, most: int = MAX_REASON_CHARS) -> None:
    v.size(field, most, len(text))


def check_permissions(v: Violations, permissions: Iterable[str]) -> None:
    listed = list(permissions)
    if len(listed) > 64:
        v.add("permissions", "at most 64")
    for index, permission in enumerate(listed):
        if not PERMISSION.fullmatch(permission):
            v.add(f"permissions[{index}]", "1-128 characters of [a-z0-9_.:*-]")
