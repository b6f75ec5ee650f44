"""Input checks shared by every RPC; each failure is a typed :class:`Fault` naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from foredeck_memory.domain import errors

MAX_CONTENT_BYTES = 32 * 1024
MAX_QUERY_BYTES = 8 * 1024
MAX_JSON_BYTES = 16 * 1024
MAX_JSON_KEYS = 64
MAX_ENTITY_REFS = 32
MAX_FILTER_ITEMS = 16

ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
CATEGORY_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PROPERTY_KEY_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
ENTITY_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
REL_TYPE_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def check_content(field: str, text: str, limit: int) -> None:
    """Content and queries: not empty, not only whitespace, at most ``limit`` bytes of UTF-8."""
    if not text.strip():
        raise errors.content_empty(field)
    size = len(text.encode())
    if size > limit:
        raise errors.content_too_large(field, limit, size)


def check_limit(field: str, value: int, low: int, high: int) -> None:
    """A result limit inside [low, high]."""
    if not low <= value <= high:
        raise errors.limit_out_of_range(field, value, low, high)


def check_json_object(
    field: str, value: Mapping[str, Any], key_re: re.Pattern[str]
) -> list[tuple[str, str]]:
    """Metadata or properties: ≤ 64 keys of the given form, ≤ 16 KiB of JSON text.

    Size faults are raised; malformed keys are returned as violations to batch with others.
    """
    if len(value) > MAX_JSON_KEYS:
        raise errors.request_too_large(field, MAX_JSON_KEYS, len(value))
    size = len(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())
    if size > MAX_JSON_BYTES:
        raise errors.request_too_large(field, MAX_JSON_BYTES, size)
    return [(f"{field}.{key}", "malformed key") for key in value if not key_re.match(key)]


def id_violations(field: str, value: str, *, required: bool) -> list[tuple[str, str]]:
    """A request id, session id or fact key: 1-128 characters of ``[A-Za-z0-9_.:-]``."""
    if not value:
        return [(field, "required")] if required else []
    if not ID_RE.match(value):
        return [(field, "must be 1-128 characters of [A-Za-z0-9_.:-]")]
    return []


def short_text_violations(field: str, value: str, limit: int = 128) -> list[tuple[str, str]]:
    """Free text such as a run or step id: at most ``limit`` characters."""
    return [(field, f"at most {limit} characters")] if len(value) > limit else []


def raise_if(violations: Iterable[tuple[str, str]]) -> None:
    """Raise INVALID_REQUEST when any violation was found."""
    listed = list(violations)
    if listed:
        raise errors.invalid(listed)


class TypeCatalogue:
    """The configured entity and relationship types."""

    def __init__(
        self, entity_types: list[tuple[str, str]], relationship_types: list[tuple[str, str]]
    ) -> None:
        self.entity_types = entity_types
        self.relationship_types = relationship_types
        self._entity_names = {name for name, _ in entity_types}
        self._rel_names = {name for name, _ in relationship_types}

    def check_entity_types(self, fields: Iterable[tuple[str, str]]) -> None:
        """Raise ENTITY_TYPE_UNKNOWN (or INVALID_REQUEST for malformed) for bad types."""
        bad = [(path, value) for path, value in fields if value not in self._entity_names]
        if bad:
            raise errors.entity_type_unknown(bad, sorted(self._entity_names))

    def check_entity_id(self, field: str, value: str) -> list[tuple[str, str]]:
        """An entity id: 1-256 characters."""
        if not 1 <= len(value) <= 256:
            return [(field, "must be 1-256 characters")]
        return []

    def check_relationship_types(self, fields: Iterable[tuple[str, str]]) -> None:
        """Raise RELATIONSHIP_TYPE_INVALID for malformed or unconfigured types."""
        bad = [
            (path, value)
            for path, value in fields
            if not REL_TYPE_RE.match(value) or (self._rel_names and value not in self._rel_names)
        ]
        if bad:
            raise errors.relationship_type_invalid(bad)
