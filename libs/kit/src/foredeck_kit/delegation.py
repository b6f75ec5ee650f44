"""Delegated principals: the orchestrator calling other services for a run, days after submit.

A gateway principal lives minutes, but a run may wait days for an approval, and its worker
calls llmrouter, toolrunner and memory long after the gateway's call ended. At submit the
orchestrator stores the caller's :class:`RunClaims`; for each downstream call it then mints a
short-lived principal with :class:`DelegationSigner`: issuer ``foredeck-orchestrator``, signed
with the orchestrator's own keys (``DELEGATION_KEYS``, key ids distinct from the gateway's),
the caller's tenant, user, permissions, budgets and kind, plus ``act: {"sub": "orchestrator"}``
(RFC 8693) and ``rid`` (the run id). Every service's :class:`~foredeck_kit.principal.
PrincipalVerifier` accepts it next to the gateway's; methods that must see the caller's own
principal refuse it (``gateway_only_methods``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from foredeck_kit import _jws
from foredeck_kit.principal import (
    DEFAULT_ACTOR,
    DEFAULT_AUDIENCE,
    DEFAULT_MAX_LIFETIME,
    DELEGATION_ISSUER,
    Principal,
    PrincipalKind,
    _check_budgets,
    _check_permissions,
    _lifetime_seconds,
    _sign_principal,
)

__all__ = ["DEFAULT_ACTOR", "DELEGATION_ISSUER", "DelegationSigner", "RunClaims"]

_RUN_CLAIM_FIELDS = frozenset({"tenant_id", "user_id", "permissions", "budget_ids", "kind"})


@dataclass(frozen=True, slots=True)
class RunClaims:
    """Who a run acts for, stored by the orchestrator at submit: the caller's identity.

    Serialisable with :meth:`to_dict` / :meth:`from_dict` (or the JSON forms) so that it can
    live in the run's record; :meth:`from_dict` validates, since the record is read back from
    a store.
    """

    tenant_id: str
    user_id: str
    permissions: tuple[str, ...] = ()
    budget_ids: tuple[str, ...] = ()
    kind: PrincipalKind = PrincipalKind.USER

    def __post_init__(self) -> None:
        if not isinstance(self.tenant_id, str) or not self.tenant_id:
            raise ValueError("run claims need a tenant_id")
        if not isinstance(self.user_id, str) or not self.user_id:
            raise ValueError("run claims need a user_id")
        if isinstance(self.permissions, str) or isinstance(self.budget_ids, str):
            raise ValueError("permissions and budget_ids are lists of strings")
        # Frozen: normalising means going around the dataclass's own __setattr__.
        object.__setattr__(self, "permissions", tuple(_check_permissions(self.permissions)))
        object.__setattr__(self, "budget_ids", tuple(_check_budgets(self.budget_ids)))
        object.__setattr__(self, "kind", PrincipalKind(self.kind))

    @classmethod
    def from_principal(cls, principal: Principal) -> RunClaims:
        """The claims of the verified caller submitting a run."""
        return cls(
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            permissions=tuple(principal.permissions),
            budget_ids=principal.budget_ids,
            kind=principal.kind,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the five fields, under their attribute names."""
        return {
            "tenant_id": self.tenant_id,
            "user_id": self.user_id,
            "permissions": list(self.permissions),
            "budget_ids": list(self.budget_ids),
            "kind": self.kind.value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunClaims:
        """Inverse of :meth:`to_dict`; raises ValueError on anything malformed or unknown."""
        if not isinstance(data, Mapping):
            raise ValueError("run claims must be a JSON object")
        unknown = set(data) - _RUN_CLAIM_FIELDS
        if unknown:
            raise ValueError(f"unknown run claim fields {sorted(unknown)}")
        permissions = data.get("permissions", [])
        budget_ids = data.get("budget_ids", [])
        if not isinstance(permissions, list) or not isinstance(budget_ids, list):
            raise ValueError("permissions and budget_ids are lists of strings")
        return cls(
            tenant_id=data.get("tenant_id", ""),
            user_id=data.get("user_id", ""),
            permissions=tuple(permissions),
            budget_ids=tuple(budget_ids),
            kind=PrincipalKind(data.get("kind", PrincipalKind.USER.value)),
        )

    def to_json(self) -> str:
        """Compact JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunClaims:
        """Inverse of :meth:`to_json`; raises ValueError on anything malformed."""
        return cls.from_dict(json.loads(text))


class DelegationSigner:
    """Mints delegated principals for a run's downstream calls; used by the orchestrator.

    ``keys`` are the orchestrator's own (``DELEGATION_KEYS``); the verifiers of every service
    accept them only for the ``issuer`` given here.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active_kid: str,
        *,
        issuer: str = DELEGATION_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        actor: str = DEFAULT_ACTOR,
        ttl: timedelta = timedelta(minutes=5),
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
    ) -> None:
        self._keys = _jws.check_keys(keys, "delegation")
        if active_kid not in self._keys:
            raise ValueError(f"active key id {active_kid!r} is not among the keys")
        if not actor:
            raise ValueError("actor must not be empty")
        _lifetime_seconds(ttl, max_lifetime)
        self._kid = active_kid
        self._issuer = issuer
        self._audience = audience
        self._actor = actor
        self._ttl = ttl
        self._max_lifetime = max_lifetime

    def mint_for_run(
        self,
        claims: RunClaims,
        run_id: str,
        ttl: timedelta | None = None,
        *,
        now: datetime | None = None,
    ) -> str:
        """Return a principal acting for ``claims`` in run ``run_id``, valid for ``ttl``.

        Mint one per downstream call (or per short batch of calls): it lives minutes, like
        the gateway's, whatever the age of the run.
        """
        if not run_id:
            raise ValueError("run_id is required")
        return _sign_principal(
            self._keys,
            self._kid,
            issuer=self._issuer,
            audience=self._audience,
            tenant_id=claims.tenant_id,
            user_id=claims.user_id,
            permissions=claims.permissions,
            budget_ids=claims.budget_ids,
            kind=claims.kind,
            lifetime=_lifetime_seconds(self._ttl if ttl is None else ttl, self._max_lifetime),
            now=now,
            delegation=(self._actor, run_id),
        )
