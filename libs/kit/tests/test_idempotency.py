"""The tool effect key: one format, and nothing that could make two steps share a key."""

from __future__ import annotations

import pytest

from foredeck_kit.idempotency import MAX_ID_CHARS, tool_effect_key


def test_key_is_run_id_and_step_id() -> None:
    assert tool_effect_key("run-7f3a", "step-2") == "run-7f3a:step-2"
    assert tool_effect_key("R_1.a", "s.b-c_9") == "R_1.a:s.b-c_9"


def test_key_is_stable_and_distinct_per_step() -> None:
    assert tool_effect_key("run-1", "step-1") == tool_effect_key("run-1", "step-1")
    assert tool_effect_key("run-1", "step-1") != tool_effect_key("run-1", "step-2")
    assert tool_effect_key("run-1", "step-1") != tool_effect_key("run-2", "step-1")


@pytest.mark.parametrize(("run_id", "step_id"), [("", "step-1"), ("run-1", "")])
def test_empty_ids_are_refused(run_id: str, step_id: str) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        tool_effect_key(run_id, step_id)


@pytest.mark.parametrize(
    ("run_id", "step_id"),
    [("run:1", "step-1"), ("run-1", "a:b"), ("run 1", "step-1"), ("run-1", "stép")],
)
def test_ids_with_other_characters_are_refused(run_id: str, step_id: str) -> None:
    # A separator inside an id would let "a:b" + "c" and "a" + "b:c" share a key.
    with pytest.raises(ValueError, match=r"\[A-Za-z0-9_.-\]"):
        tool_effect_key(run_id, step_id)


def test_ids_over_the_limit_are_refused() -> None:
    longest = "r" * MAX_ID_CHARS
    assert len(tool_effect_key(longest, longest)) == 2 * MAX_ID_CHARS + 1
    with pytest.raises(ValueError, match="at most"):
        tool_effect_key(longest + "r", "step-1")
    with pytest.raises(ValueError, match="at most"):
        tool_effect_key("run-1", longest + "s")
