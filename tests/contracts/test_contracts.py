"""Rules of the contracts that buf lint does not check, asserted on the generated descriptors."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
)

from foredeck.common.v1 import run_event_pb2
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
# Writes that replace a resource's fields from the request: each takes an AIP-134 field mask and
# an etag, so an older client never clears a field it does not know and a stale read is refused.
UPDATE_PREFIXES = ("Update", "Set")
UPDATES_NAMED_OTHERWISE = {
    "foredeck.gateway.v1.GatewayService.CreateAgentVersion",
    "foredeck.orchestrator.v1.AgentService.CreateAgentVersion",
}
GRPC_CODES = [
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]
# The code each shared reason always travels with, in every service and every document.
SHARED_REASON_CODES = {
    "REQUEST_ID_REUSED": "FAILED_PRECONDITION",
    "PAGE_TOKEN_INVALID": "INVALID_ARGUMENT",
    "DELEGATION_NOT_ALLOWED": "PERMISSION_DENIED",
}


# Every IDEMPOTENT RPC, with why repeating it is safe. Clients and meshes retry these on
# UNAVAILABLE without asking, so each entry must hold for a blind repeat of the same request.
IDEMPOTENT_RPCS = {
    "foredeck.gateway.v1.GatewayService.CreateAgent": (
        "required request_id: a repeat returns the agent the first call created"
    ),
    "foredeck.gateway.v1.GatewayService.CreateAgentVersion": (
        "required request_id, checked before the etag: a repeat returns the first version"
    ),
    "foredeck.gateway.v1.GatewayService.DeleteAgent": (
        "archiving an archived agent changes nothing and returns it unchanged"
    ),
    "foredeck.gateway.v1.GatewayService.CreateRun": (
        "required request_id: a repeat returns the first run without reserving or queueing again"
    ),
    "foredeck.gateway.v1.GatewayService.CancelRun": (
        "cancelling a cancelled run changes nothing and returns it unchanged"
    ),
    "foredeck.gateway.v1.GatewayService.ResolveApproval": (
        "an approval leaves PENDING once; the same decision again returns it as first decided"
    ),
    "foredeck.gateway.v1.GatewayService.ForkRun": (
        "required request_id: a repeat returns the first fork without reserving or queueing again"
    ),
    "foredeck.gateway.v1.AdminService.CreateApiKey": (
        "required request_id: a repeat returns the first key (secret withheld), no second key"
    ),
    "foredeck.gateway.v1.AdminService.RevokeApiKey": (
        "revoking a revoked key keeps the first revocation and returns it unchanged"
    ),
    "foredeck.gateway.v1.AdminService.SetBudget": (
        "writes absolute limits only (resets moved out); an optional request_id replays the first"
    ),
    "foredeck.gateway.v1.AdminService.ResetBudgetSpend": (
        "required request_id: a repeat returns the first reset's response and resets nothing"
    ),
    "foredeck.orchestrator.v1.AgentService.CreateAgent": (
        "required request_id: a repeat returns the agent the first call created"
    ),
    "foredeck.orchestrator.v1.AgentService.CreateAgentVersion": (
        "required request_id, checked before the etag: a repeat returns the first version"
    ),
    "foredeck.orchestrator.v1.AgentService.DeleteAgent": (
        "archiving an archived agent changes nothing and returns it unchanged"
    ),
    "foredeck.orchestrator.v1.RunService.SubmitRun": (
        "required request_id: a repeat returns the first run and queues nothing again"
    ),
    "foredeck.orchestrator.v1.RunService.CancelRun": (
        "cancelling a cancelled run changes nothing and returns it unchanged"
    ),
    "foredeck.orchestrator.v1.RunService.ResolveApproval": (
        "an approval leaves PENDING once; the same decision again returns it as first decided"
    ),
    "foredeck.orchestrator.v1.RunService.ForkRun": (
        "required request_id: a repeat returns the first fork and forks nothing again"
    ),
    "foredeck.toolrunner.v1.ToolRegistryService.RegisterTool": (
        "required request_id: a repeat returns the tool as first registered"
    ),
    "foredeck.toolrunner.v1.ToolRegistryService.UpdateTool": (
        "required request_id, checked before the etag: a repeat returns the first new version"
    ),
    "foredeck.toolrunner.v1.ToolRegistryService.DeregisterTool": (
        "required request_id: a repeat returns the first response instead of TOOL_NOT_FOUND"
    ),
    "foredeck.toolrunner.v1.ToolRegistryService.ImportMcpServer": (
        "required request_id: a repeat returns the first import without contacting the server"
    ),
    "foredeck.toolrunner.v1.ToolRunnerService.ExecuteTool": (
        "required idempotency_key (<run_id>:<step_id> in a run): the ledger returns the outcome"
    ),
    "foredeck.toolrunner.v1.ToolHostService.InvokeTool": (
        "the runner's idempotency_key: a host returns the first outcome for a repeated key"
    ),
    "foredeck.memory.v1.WorkingMemoryService.AppendMessages": (
        "required request_id: a repeat appends nothing and returns the first sequence numbers"
    ),
    "foredeck.memory.v1.WorkingMemoryService.GetContextWindow": (
        "writes only derived summaries, each range once; a repeat returns the same window"
    ),
    "foredeck.memory.v1.WorkingMemoryService.ClearSession": (
        "a cleared session has nothing left to delete; a repeat returns zero counts"
    ),
    "foredeck.memory.v1.LongTermMemoryService.Remember": (
        "required request_id: a repeat writes nothing and returns the first response"
    ),
    "foredeck.memory.v1.LongTermMemoryService.RememberMany": (
        "required request_id: a repeat writes nothing and returns the first results"
    ),
    "foredeck.memory.v1.LongTermMemoryService.UpdateMemory": (
        "required request_id, checked before the etag: a repeat returns the first response"
    ),
    "foredeck.memory.v1.LongTermMemoryService.DeleteMemory": (
        "a retired chain never becomes current again; allow_missing makes a purge repeatable"
    ),
    "foredeck.memory.v1.LongTermMemoryService.ForgetUser": (
        "a repeat finds nothing of the user left and returns zero counts"
    ),
    "foredeck.memory.v1.EntityMemoryService.UpsertEntities": (
        "required request_id: a repeat writes nothing and returns the first results"
    ),
    "foredeck.memory.v1.EntityMemoryService.UpsertRelationships": (
        "required request_id: a repeat writes nothing and returns the first results"
    ),
    "foredeck.memory.v1.EntityMemoryService.DeleteEntity": (
        "retires only what is current; allow_missing makes a purge repeatable"
    ),
    "foredeck.llmrouter.v1.LlmRouterService.Embed": (
        "changes and records nothing; the same texts give the same vectors"
    ),
}


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


def _all_files() -> list[FileDescriptor]:
    return [file for package in ("common", *SERVICES) for file in _service_files(package)]


def _messages(message: Descriptor) -> Iterator[Descriptor]:
    yield message
    for nested in message.nested_types:
        yield from _messages(nested)


def _enums() -> Iterator[EnumDescriptor]:
    for file in _all_files():
        yield from file.enum_types_by_name.values()
        for message in file.message_types_by_name.values():
            for each in _messages(message):
                yield from each.enum_types


def _field(message: Descriptor, name: str) -> FieldDescriptor | None:
    return message.fields_by_name.get(name)


def _proto_texts() -> dict[Path, str]:
    directory = ROOT / "proto" / "foredeck"
    return {
        path: path.read_text(encoding="utf-8")
        for path in sorted([*directory.rglob("*.proto"), *directory.rglob("README.md")])
    }


def _reason_codes(service: str) -> dict[str, str]:
    """Map each ErrorReason value to the gRPC code its comment starts with."""
    text = (ROOT / "proto" / "foredeck" / service / "v1" / "error_reason.proto").read_text()
    codes: dict[str, str] = {}
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped.removeprefix("//").strip())
            continue
        value = re.match(r"ERROR_REASON_(\w+) = \d+;", stripped)
        if value and value.group(1) != "UNSPECIFIED":
            first = re.match(r"[A-Z_]+", comment[0]) if comment else None
            codes[value.group(1)] = first.group(0) if first else ""
        comment = []
    return codes


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


def test_idempotent_rpcs_are_listed_with_why_a_repeat_is_safe() -> None:
    idempotent = {m.full_name for m in _methods() if m.GetOptions().idempotency_level == IDEMPOTENT}
    assert sorted(idempotent - IDEMPOTENT_RPCS.keys()) == [], "IDEMPOTENT but not listed"
    assert sorted(IDEMPOTENT_RPCS.keys() - idempotent) == [], "listed but not IDEMPOTENT"
    for name, reason in IDEMPOTENT_RPCS.items():
        assert reason.strip(), name
        assert "\n" not in reason, name


def test_idempotency_reasons_name_fields_that_exist() -> None:
    methods = {m.full_name: m for m in _methods()}
    for name, reason in IDEMPOTENT_RPCS.items():
        for key in ("request_id", "idempotency_key"):
            if key in reason:
                assert _field(methods[name].input_type, key) is not None, (name, key)


def test_updates_take_a_field_mask_and_an_etag() -> None:
    updates = [
        m
        for m in _methods()
        if m.name.startswith(UPDATE_PREFIXES) or m.full_name in UPDATES_NAMED_OTHERWISE
    ]
    assert {m.full_name for m in updates} >= UPDATES_NAMED_OTHERWISE
    for method in updates:
        mask = _field(method.input_type, "update_mask")
        assert mask is not None, method.full_name
        assert mask.message_type is not None, method.full_name
        assert mask.message_type.full_name == "google.protobuf.FieldMask", method.full_name
        etag = _field(method.input_type, "etag")
        assert etag is not None, method.full_name
        assert etag.type == FieldDescriptor.TYPE_STRING, method.full_name


@pytest.mark.parametrize("service", SERVICES)
def test_services_taking_etags_report_a_mismatch(service: str) -> None:
    takes_etag = any(
        _field(m.input_type, "etag") is not None
        for m in _methods()
        if m.full_name.startswith(f"foredeck.{service}.v1.")
    )
    module = importlib.import_module(f"foredeck.{service}.v1.error_reason_pb2")
    values = module.DESCRIPTOR.enum_types_by_name["ErrorReason"].values_by_name
    mismatch = values.get("ERROR_REASON_ETAG_MISMATCH")
    assert (mismatch is not None) == takes_etag, service
    if mismatch is not None:
        assert mismatch.number >= 20
        assert _reason_codes(service)["ETAG_MISMATCH"] == "ABORTED"


def test_lists_page_with_size_and_token() -> None:
    paged = [
        m
        for m in _methods()
        if m.name.startswith("List") or _field(m.input_type, "page_size") is not None
    ]
    assert paged
    for method in paged:
        size = _field(method.input_type, "page_size")
        token = _field(method.input_type, "page_token")
        assert size is not None, method.full_name
        assert size.type == FieldDescriptor.TYPE_INT32, method.full_name
        assert token is not None, method.full_name
        assert token.type == FieldDescriptor.TYPE_STRING, method.full_name
        assert _field(method.output_type, "next_page_token") is not None, method.full_name


def test_page_sizes_over_the_maximum_are_clamped_everywhere() -> None:
    """AIP-158: 0 means the default and a value above the maximum is treated as the maximum."""
    for path, text in _proto_texts().items():
        if path.suffix != ".proto":
            continue
        lines = text.splitlines()
        for index, line in enumerate(lines):
            if re.match(r"\s*int32 page_size = \d+;", line):
                comment: list[str] = []
                for above in reversed(lines[:index]):
                    if not above.strip().startswith("//"):
                        break
                    comment.insert(0, above.strip().removeprefix("//").strip())
                wording = " ".join(comment)
                assert "0 means" in wording, (path.name, index + 1)
                assert "are treated as" in wording, (path.name, index + 1)


def test_paged_rpcs_name_page_token_invalid() -> None:
    """Every paged RPC of a Foredeck service documents the one reason for a bad page token.

    ToolHostService is left out: tool hosts are written outside Foredeck and use bare codes.
    """
    paged = {m.full_name for m in _methods() if _field(m.input_type, "page_token") is not None}
    rpc = re.compile(r"((?:[ \t]*//[^\n]*\n)+)[ \t]*rpc (\w+)\(")
    documented: set[str] = set()
    for path, text in _proto_texts().items():
        if not path.name.endswith("_service.proto"):
            continue
        package = "foredeck." + ".".join(path.parent.relative_to(ROOT / "proto" / "foredeck").parts)
        for match in rpc.finditer(text):
            owner = text.rfind("\nservice ", 0, match.start())
            service = text[owner:].split()[1]
            if "PAGE_TOKEN_INVALID" in match.group(1):
                documented.add(f"{package}.{service}.{match.group(2)}")
    hosts = {name for name in paged if ".ToolHostService." in name}
    assert hosts
    assert sorted(paged - hosts - documented) == []


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_refuses_delegation_with_reason_14(service: str) -> None:
    module = importlib.import_module(f"foredeck.{service}.v1.error_reason_pb2")
    enum = module.DESCRIPTOR.enum_types_by_name["ErrorReason"]
    assert enum.values_by_number[14].name == "ERROR_REASON_DELEGATION_NOT_ALLOWED"


def test_shared_reasons_have_one_code_in_every_service() -> None:
    codes = {service: _reason_codes(service) for service in SERVICES}
    for reason in Reason:
        found = {service: codes[service].get(reason.value) for service in SERVICES}
        assert len(set(found.values())) == 1, (reason.value, found)
        assert next(iter(found.values())) in GRPC_CODES, (reason.value, found)
    for name, code in SHARED_REASON_CODES.items():
        assert codes["gateway"][name] == code


def test_documents_give_shared_reasons_their_one_code() -> None:
    """No README or proto comment pairs a shared reason with another code."""
    code = "|".join(GRPC_CODES)
    for reason, expected in SHARED_REASON_CODES.items():
        before = re.compile(rf"\b({code})\b[`\s/]*(?:with\s+)?`?{reason}\b")
        after = re.compile(rf"\b{reason}`?\s*\|\s*`?({code})\b")
        for path, text in _proto_texts().items():
            for match in [*before.finditer(text), *after.finditer(text)]:
                assert match.group(1) == expected, (path.name, match.group(0))


def test_unused_enum_numbers_are_reserved() -> None:
    for enum in _enums():
        proto = descriptor_pb2.EnumDescriptorProto()
        enum.CopyToProto(proto)
        used = {value.number for value in proto.value}
        reserved = {number for r in proto.reserved_range for number in range(r.start, r.end + 1)}
        gaps = sorted(set(range(max(used) + 1)) - used - reserved)
        assert gaps == [], (enum.full_name, gaps)


def test_event_type_filters_are_the_enum() -> None:
    filters = [
        (m.full_name, field)
        for m in _methods()
        for field in m.input_type.fields
        if "event_type" in field.name
    ]
    assert filters
    for name, field in filters:
        assert field.type == FieldDescriptor.TYPE_ENUM, name
        assert field.enum_type is not None, name
        assert field.enum_type.full_name == "foredeck.common.v1.RunEventType", name


def test_run_event_types_name_the_payload_cases() -> None:
    event = run_event_pb2.RunEvent.DESCRIPTOR
    cases = {field.name for field in event.oneofs_by_name["payload"].fields}
    types = {
        value.name.removeprefix("RUN_EVENT_TYPE_").lower()
        for value in run_event_pb2.DESCRIPTOR.enum_types_by_name["RunEventType"].values
        if value.number
    }
    assert types == cases


def test_messages_are_defined_once() -> None:
    """A shared shape lives in foredeck.common.v1; only per-RPC requests and responses repeat.

    The gateway's public requests mirror the orchestrator's on purpose (see the gateway README).
    """
    owners: dict[str, list[str]] = {}
    for file in _all_files():
        for message in file.message_types_by_name.values():
            owners.setdefault(message.name, []).append(file.package)
    repeated = {
        name: packages
        for name, packages in owners.items()
        if len(packages) > 1 and not name.endswith(("Request", "Response"))
    }
    assert repeated == {}
