"""Redis key names of the orchestrator.

Every key of one run carries the run id as its hash tag (``{r_…}``), so the run's record,
journal and event stream share a Redis Cluster slot and one Lua script can change them
together. Queues, the dead-letter stream and the concurrency slots each have a tag of their
own; the scripts never mix a run's keys with them.
"""

from __future__ import annotations

import hashlib

__all__ = ["Keys", "digest"]

PRIORITIES = ("high", "normal", "low")


def digest(*parts: str, size: int = 16) -> str:
    """A short hex digest of ids: brace-free, so it can sit inside a hash tag."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:size]


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "fdorch") -> None:
        self.prefix = prefix

    # --- runs -------------------------------------------------------------------------------

    def run(self, run_id: str) -> str:
        """The run's record (a hash)."""
        return f"{self.prefix}:run:{{{run_id}}}"

    def journal(self, run_id: str) -> str:
        """The run's step journal (a list of JournalEntry bytes)."""
        return f"{self.prefix}:run:{{{run_id}}}:journal"

    def events(self, run_id: str) -> str:
        """The run's event stream."""
        return f"{self.prefix}:run:{{{run_id}}}:events"

    def tenant_runs(self, tenant_id: str) -> str:
        """The tenant's runs by creation time (a sorted set)."""
        return f"{self.prefix}:runs:{{t{digest(tenant_id)}}}"

    # --- queues -----------------------------------------------------------------------------

    def queue(self, priority: str) -> str:
        """The stream of runs waiting at one priority (``high``, ``normal``, ``low``)."""
        return f"{self.prefix}:queue:{{{priority}}}"

    def queues(self) -> list[str]:
        """Every priority stream, highest first."""
        return [self.queue(p) for p in PRIORITIES]

    @property
    def submitting(self) -> str:
        """Runs whose submission began but may not have reached a queue (a sorted set by time)."""
        return f"{self.prefix}:submitting:{{s}}"

    @property
    def dead_letters(self) -> str:
        """The stream of runs moved out of the queues after too many deliveries."""
        return f"{self.prefix}:dlq"

    @property
    def group(self) -> str:
        """The workers' consumer group on every queue."""
        return "workers"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel on which cancelled run ids are announced to workers."""
        return f"{self.prefix}:cancel"

    # --- concurrency slots ------------------------------------------------------------------

    @property
    def global_slots(self) -> str:
        """Runs executing across every worker (a sorted set scored by lease expiry)."""
        return f"{self.prefix}:slots:{{c}}:global"

    def user_slots(self, user_key: str) -> str:
        """Runs of one user executing (same slot as :attr:`global_slots`)."""
        return f"{self.prefix}:slots:{{c}}:user:{user_key}"

    # --- agents -----------------------------------------------------------------------------

    def agent(self, tenant_id: str, name: str) -> str:
        """One agent: its versions, latest version number and state (a hash)."""
        return f"{self.prefix}:agent:{{a{digest(tenant_id, name)}}}"

    def agent_requests(self, tenant_id: str, name: str) -> str:
        """Request ids of the agent's writes (same slot as :meth:`agent`)."""
        return f"{self.prefix}:agent:{{a{digest(tenant_id, name)}}}:req"

    def agent_index(self, tenant_id: str) -> str:
        """The tenant's agent names (a sorted set, read in lexical order)."""
        return f"{self.prefix}:agents:{{t{digest(tenant_id)}}}"


def run_id_for(tenant_id: str, request_id: str) -> str:
    """The run id a submission gets: derived from tenant and request id, so a retry of the
    same submission names the same run and its idempotency check stays in the run's slot."""
    return "r_" + digest(tenant_id, request_id, size=32)


def user_key(tenant_id: str, user_id: str) -> str:
    """A brace-free key part naming one user of one tenant."""
    return digest(tenant_id, user_id)
