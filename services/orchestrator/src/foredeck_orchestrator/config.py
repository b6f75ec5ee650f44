"""Settings of the orchestrator, read once in ``main()`` from ``FOREDECK_ORCHESTRATOR_*``.

Both roles (the API and the worker) read the same class; each uses the fields it needs.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from foredeck_kit.settings import ServiceSettings

__all__ = ["OrchestratorSettings"]


class OrchestratorSettings(ServiceSettings):
    """Everything the orchestrator's API and worker roles read from their environment."""

    model_config = SettingsConfigDict(env_prefix="FOREDECK_ORCHESTRATOR_")

    service_name: str = "orchestrator"

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis holding agents, runs, journals, events, queues and leases.",
    )
    redis_max_connections: int = Field(
        default=512,
        ge=4,
        description="Most Redis connections one process opens; callers beyond wait for one.",
    )
    redis_watch_connections: int = Field(
        default=1024,
        ge=1,
        description="Connections of the API role's own pool for WatchRun's blocking reads: "
        "at most this many watchers wait at once; more wait for a connection.",
    )
    redis_pool_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How long a call waits for a free Redis connection before it fails "
        "with STORE_UNAVAILABLE.",
    )
    key_prefix: str = Field(
        default="fdorch",
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="Prefix of every Redis key the orchestrator writes.",
    )
    llmrouter_address: str = Field(
        default="127.0.0.1:50051", description="host:port of the llmrouter (worker role)."
    )
    toolrunner_address: str = Field(
        default="127.0.0.1:50052", description="host:port of the toolrunner (worker role)."
    )
    memory_address: str = Field(
        default="127.0.0.1:50053", description="host:port of the memory service (worker role)."
    )
    worker_concurrency: int = Field(
        default=16, ge=1, le=4096, description="Runs one worker process drives at once."
    )
    lease_seconds: float = Field(
        default=30.0,
        gt=0.2,
        description="How long a worker's hold on a run lasts without a heartbeat; a run whose "
        "worker stopped heartbeating is taken over by another worker after this long.",
    )
    heartbeat_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Interval of lease heartbeats; 0 means a third of lease_seconds.",
    )
    reclaim_interval_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Interval of the reclaimer's walk of the pending lists; 0 means half of "
        "lease_seconds.",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Times a run may be taken up by a worker before it is dead-lettered.",
    )
    global_concurrency_limit: int = Field(
        default=1000,
        ge=1,
        description="Runs executing at once across every worker.",
    )
    user_concurrency_limit: int = Field(
        default=10,
        ge=1,
        description="Runs of one user (tenant + user) executing at once across every worker.",
    )
    priority_weights: str = Field(
        default="4,2,1",
        pattern=r"^\d+,\d+,\d+$",
        description="Weights of the high, normal and low priority queues when all have work: "
        "out of every 7 reads (4+2+1), low gets at least 1, so it is never starved.",
    )
    max_queue_length: int = Field(
        default=1_000_000,
        ge=1,
        description="Runs waiting in one priority queue beyond which SubmitRun answers QUEUE_FULL.",
    )
    event_retention: int = Field(
        default=10_000,
        ge=100,
        description="Events kept per run; WatchRun from an older event id is EVENTS_TRIMMED.",
    )
    run_ttl_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="How long a finished run's record, journal and events are kept.",
    )
    idempotency_ttl_seconds: int = Field(
        default=24 * 3600, ge=60, description="How long request ids are remembered."
    )
    requeue_delay_seconds: float = Field(
        default=0.05,
        ge=0,
        description="Pause before a run refused a concurrency slot goes back to its queue.",
    )
    llm_timeout_seconds: float = Field(
        default=120.0, gt=0, description="Longest one llmrouter call may take."
    )
    tool_timeout_seconds: float = Field(
        default=300.0, gt=0, description="Longest one toolrunner call may take."
    )
    memory_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Longest one memory call may take."
    )
    worker_id: str = Field(
        default="",
        description="This worker's consumer name in the queues; empty means host name + pid.",
    )

    def weights(self) -> tuple[int, int, int]:
        """The high, normal and low queue weights, each at least 1."""
        high, normal, low = (max(1, int(part)) for part in self.priority_weights.split(","))
        return high, normal, low

    def heartbeat_interval(self) -> float:
        """Seconds between lease heartbeats."""
        return self.heartbeat_seconds or self.lease_seconds / 3

    def reclaim_interval(self) -> float:
        """Seconds between walks of the pending lists."""
        return self.reclaim_interval_seconds or self.lease_seconds / 2
