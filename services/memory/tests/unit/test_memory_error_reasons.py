"""The memory error catalogue carries every shared reason the kit knows."""

from __future__ import annotations

from foredeck.memory.v1 import error_reason_pb2
from foredeck_kit.errors import missing_shared_reasons
from foredeck_memory.domain.errors import STORE_REASONS


def test_shared_reasons_present() -> None:
    assert missing_shared_reasons(error_reason_pb2.ErrorReason.keys()) == []


def test_store_reasons_exist_in_the_catalogue() -> None:
    names = set(error_reason_pb2.ErrorReason.keys())
    assert {f"ERROR_REASON_{reason}" for reason in STORE_REASONS.values()} <= names
