"""Rules of the contracts that buf lint does not check, asserted on the generated descriptors."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor

from foredeck_kit.errors import Reason

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "orchestrator", "toolrunner", "memory", "llmrouter")
# Streaming is only for LLM tokens and run events.
STREAMING_METHODS = {
    "foredeck.gateway.v1.GatewayService.WatchRun",
    "foredeck.orchestrator.v1.RunService.WatchRun",
    "foredeck.llmrouter.v1.LlmRouterService.StreamGenerate",
}
READ_PREFIXES = ("Get", "List", "Watch", "Count", "Export", "Recall", "Search", "WhoAmI")
NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
IDEMPOTENT = descriptor_pb2.MethodOptions.IDEMPOTENT
# Reads that may write derived data: a context window may store a summary of older turns.
READS_THAT_WRITE = {"foredeck.memory.v1.WorkingMemoryService.GetContextWindow"}


def _service_files(service: str) -> list[FileDescriptor]:
    directory = ROOT / "proto" / "foredeck" / service / "v1"
    modules = [
        importlib.import_module(f"foredeck.{service}.v1.{path.stem}_pb2")
        for path in sorted(directory.glob("*.proto"))
    ]
    return [module.DESCRIPTOR for module in modules]


def _methods() -> Iterator[MethodDescriptor]:
    for service in SERVICES:
        for file in _service_files(service):
            for svc in file.services_by_name.values():
                yield from svc.methods


def test_every_package_has_a_readme_and_an_error_reason_enum() -> None:
    for service in ("common", *SERVICES):
        assert (ROOT / "proto" / "foredeck" / service / "v1" / "README.md").is_file(), service
    for service in SERVICES:
        module = importlib.import_module(f"foredeck.{service}.v1.error_reason_pb2")
        assert "ErrorReason" in module.DESCRIPTOR.enum_types_by_name, service


@pytest.mark.parametrize("service", SERVICES)
def test_shared_error_reasons_match_the_kit(service: str) -> None:
    module = importlib.import_module(f"foredeck.{service}.v1.error_reason_pb2")
    enum = module.DESCRIPTOR.enum_types_by_name["ErrorReason"]
    shared = {v.name.removeprefix("ERROR_REASON_"): v.number for v in enum.values if v.number < 20}
    del shared["UNSPECIFIED"]
    assert shared == {reason.value: number for reason, number in Reason.numbered()}
    own = [v.number for v in enum.values if v.number >= 20]
    assert own, f"{service} defines no reasons of its own"


def test_reads_declare_no_side_effects() -> None:
    reads = [m for m in _methods() if m.name.startswith(READ_PREFIXES)]
    assert reads
    wrong = [
        m.full_name
        for m in reads
        if m.GetOptions().idempotency_level
        != (IDEMPOTENT if m.full_name in READS_THAT_WRITE else NO_SIDE_EFFECTS)
    ]
    assert wrong == []


def test_streaming_only_for_tokens_and_run_events() -> None:
    streaming = {m.full_name for m in _methods() if m.client_streaming or m.server_streaming}
    assert streaming == STREAMING_METHODS
    assert not any(m.client_streaming for m in _methods())


def test_no_request_takes_a_tenant_id() -> None:
    """The tenant comes from the verified principal, never from a request body.

    The gateway's admin service is the exception: an operator names the tenant a key is for.
    """
    offenders = [
        f"{m.full_name}.{field.name}"
        for m in _methods()
        if m.containing_service.name != "AdminService"
        for field in m.input_type.fields
        if field.name == "tenant_id"
    ]
    assert offenders == []
