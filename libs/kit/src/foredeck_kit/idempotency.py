"""The idempotency key of a tool effect, built one way by every service.

A tool call's side effect is keyed by the run and the step that make it: ``<run_id>:<step_id>``.
Both ids are assigned by the orchestrator and stay the same across attempts, worker crashes,
re-deliveries and re-generated plans, unlike the model's tool call id, so the toolrunner's
effect ledger runs each step's tool at most once.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ID_CHARS", "SEPARATOR", "tool_effect_key"]

SEPARATOR = ":"
"""Separates the run id from the step id; neither id may contain it, so a key splits one way."""

MAX_ID_CHARS = 128
"""The longest run id or step id, so a key is at most 257 characters."""

_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


def _check_id(name: str, value: str) -> None:
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{name} must be at most {MAX_ID_CHARS} characters, got {len(value)}")
    if not _ID_PATTERN.fullmatch(value):
        raise ValueError(f"{name} must be characters of [A-Za-z0-9_.-], got {value!r}")


def tool_effect_key(run_id: str, step_id: str) -> str:
    """Return the idempotency key of the tool call a run's step makes: ``<run_id>:<step_id>``.

    Raises ``ValueError`` for an empty id, an id over 128 characters, or an id with a character
    outside ``[A-Za-z0-9_.-]`` (a ``:`` would make the key ambiguous).
    """
    _check_id("run_id", run_id)
    _check_id("step_id", step_id)
    return f"{run_id}{SEPARATOR}{step_id}"
