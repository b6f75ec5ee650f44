"""ListApprovals and ResolveApproval: what the API role does with approvals.

Both are tenant-scoped through the run: an approval is visible when its run is (the caller's
own run, or any run of the tenant with ``runs:all_users``). A pending approval past its expiry
is expired, and one whose run ended is cancelled, before it is shown or decided.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from foredeck.common.v1 import approval_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck_kit.principal import Principal
from foredeck_orchestrator.adapters.redis_runs import RedisRuns, RunRecord
from foredeck_orchestrator.approvals import APPROVED, DENIED, PENDING, RedisApprovals
from foredeck_orchestrator.validation import (
    check_page_size,
    decode_page_token,
    encode_page_token,
    invalid,
    not_found,
    precondition,
)

__all__ = ["list_approvals", "resolve_approval"]

_SCAN_LIMIT = 5000


def _allowed(principal: Principal, approval: approval_pb2.Approval, all_users: bool) -> bool:
    if approval.tenant_id != principal.tenant_id:
        return False
    return all_users or approval.user_id == principal.user_id


async def list_approvals(
    approvals: RedisApprovals,
    principal: Principal,
    request: pb.ListApprovalsRequest,
    visible_run: Callable[[Principal, str], Awaitable[RunRecord]],
) -> pb.ListApprovalsResponse:
    """One page of approvals, oldest request first."""
    if request.include_all_users:
        principal.require("runs:all_users")
    size = check_page_size(request.page_size, 50, 200)
    statuses = set(request.statuses) or {PENDING}
    if len(request.statuses) > 5 or approval_pb2.APPROVAL_STATUS_UNSPECIFIED in request.statuses:
        raise invalid("statuses", "at most 5, none unspecified")
    if any(s not in approval_pb2.ApprovalStatus.values() for s in statuses):
        raise invalid("statuses", "unknown status")
    all_users = principal.has("runs:all_users") and (
        request.include_all_users or bool(request.run_id)
    )
    query = json.dumps(
        [
            principal.tenant_id,
            principal.user_id,
            request.run_id,
            sorted(statuses),
            request.include_all_users,
        ]
    )
    position = decode_page_token(request.page_token, query)
    offset = int(position) if isinstance(position, int) else 0
    out: list[approval_pb2.Approval] = []
    more = False
    if request.run_id:
        await visible_run(principal, request.run_id)
        found = [await approvals.settle(a) for a in await approvals.of_run(request.run_id)]
        matching = [a for a in found if a.status in statuses]
        out = matching[offset : offset + size]
        more = len(matching) > offset + size
        token = encode_page_token(query, offset + size) if more else ""
        return pb.ListApprovalsResponse(approvals=out, next_page_token=token)
    scanned = 0
    while len(out) < size and scanned < _SCAN_LIMIT:
        ids = await approvals.tenant_page(principal.tenant_id, offset, 100)
        if not ids:
            break
        for approval in await approvals.get_many(ids):
            if len(out) == size:
                break
            offset += 1
            scanned += 1
            if approval is None or not _allowed(principal, approval, all_users):
                continue
            approval = await approvals.settle(approval)
            if approval.status in statuses:
                out.append(approval)
    more = bool(await approvals.tenant_page(principal.tenant_id, offset, 1))
    token = encode_page_token(query, offset) if more else ""
    return pb.ListApprovalsResponse(approvals=out, next_page_token=token)


async def resolve_approval(
    approvals: RedisApprovals,
    runs: RedisRuns,
    principal: Principal,
    request: pb.ResolveApprovalRequest,
    visible: Callable[[Principal, RunRecord | None], bool],
) -> pb.ResolveApprovalResponse:
    """Approve or deny a pending tool call and queue its run again."""
    principal.require("approvals:resolve")
    if not request.approval_id:
        raise invalid("approval_id", "required")
    if request.decision not in (
        approval_pb2.APPROVAL_DECISION_APPROVE,
        approval_pb2.APPROVAL_DECISION_DENY,
    ):
        raise invalid("decision", "APPROVE or DENY")
    if len(request.reason) > 1024:
        raise invalid("reason", "at most 1,024 characters")
    missing = not_found(
        "APPROVAL_NOT_FOUND", "approval not found", approvalId=request.approval_id[:80]
    )
    approval = await approvals.get(request.approval_id)
    if approval is None or approval.tenant_id != principal.tenant_id:
        raise missing
    if not visible(principal, await runs.get(approval.run_id)):
        raise missing
    wanted = APPROVED if request.decision == approval_pb2.APPROVAL_DECISION_APPROVE else DENIED
    approval = await approvals.settle(approval)
    if approval.status == PENDING:
        decision = await approvals.decide(
            request.approval_id, wanted, decided_by=principal.user_id, reason=request.reason
        )
        if decision.approval is None:
            raise missing
        approval = decision.approval
    if approval.status == wanted:
        # The same decision again: the approval as first decided.
        return pb.ResolveApprovalResponse(approval=approval)
    raise precondition(
        "APPROVAL_NOT_PENDING",
        "the approval is no longer pending",
        approvalId=request.approval_id,
        status=approval_pb2.ApprovalStatus.Name(approval.status),
    )
