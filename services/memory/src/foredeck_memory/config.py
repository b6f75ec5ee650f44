"""Settings of the memory service, read once in ``main()`` from ``FOREDECK_MEMORY_*``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from foredeck_kit.settings import ServiceSettings

DEFAULT_ENTITY_TYPES = (
    "Person:A human being the agents know about.,"
    "Organization:A company, team or other group of people.,"
    "Project:A piece of work with a goal, such as a product or an initiative.,"
    "Place:A location: a city, an address, a venue.,"
    "Topic:A subject or concept that conversations are about.,"
    "Document:A file, page or other written artefact.,"
    "Event:Something that happens at a point or span in time."
)


def parse_named_list(spec: str) -> list[tuple[str, str]]:
    """Parse ``Name:description,Name2:description`` into (name, description) pairs."""
    out: list[tuple[str, str]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, description = item.partition(":")
        out.append((name.strip(), description.strip()))
    return out


class MemorySettings(ServiceSettings):
    """Everything the memory service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="FOREDECK_MEMORY_")

    service_name: str = "memory"

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for working memory, idempotency records, locks and the outbox.",
    )
    neo4j_uri: str = Field(
        default="bolt://127.0.0.1:7687", description="Bolt URI of Neo4j 5 or ArcadeDB."
    )
    neo4j_user: str = Field(default="neo4j", description="Bolt user.")
    neo4j_password: SecretStr = Field(default=SecretStr(""), description="Bolt password.")
    neo4j_database: str = Field(default="foredeck", description="Graph database name.")
    neo4j_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How long the driver retries a transaction before the graph counts as down.",
    )
    neo4j_connect_timeout_seconds: float = Field(
        default=2.0, gt=0, description="Bolt connection timeout."
    )

    vector_backend: Literal["edge", "qdrant"] = Field(
        default="edge",
        description="`edge`: Qdrant Edge in-process (embedded default); `qdrant`: a Qdrant server.",
    )
    edge_path: str = Field(
        default=".foredeck/memory/vectors",
        description="Directory of the Qdrant Edge shard this process owns.",
    )
    qdrant_url: str = Field(
        default="http://127.0.0.1:6333", description="Qdrant server URL (vector_backend=qdrant)."
    )
    qdrant_api_key: SecretStr = Field(default=SecretStr(""), description="Qdrant API key.")
    qdrant_collection: str = Field(default="foredeck_memories", description="Qdrant collection.")

    embedding_model: str = Field(
        default="",
        description="Empty: the local MiniLM model; otherwise an embedding model via llmrouter.",
    )
    embedding_dimensions: int = Field(
        default=384, ge=1, description="Vector size when embedding through llmrouter."
    )
    embedding_batch_size: int = Field(default=32, ge=1, description="Local embedder batch size.")
    embedding_threads: int = Field(default=1, ge=1, description="Local embedder intra-op threads.")

    llmrouter_address: str = Field(
        default="",
        description="host:port of llmrouter; needed for summaries (and remote embeddings).",
    )
    summarization_model: str = Field(
        default="local-small", description="Model that writes working-memory summaries."
    )

    near_duplicate_threshold: float = Field(
        default=0.95, ge=0.5, le=1.0, description="Similarity at which memories merge."
    )
    session_ttl_seconds: int = Field(
        default=7 * 24 * 3600, ge=60, description="Default working-memory session lifetime."
    )
    max_session_messages: int = Field(default=100_000, ge=1, description="Messages per session.")
    entity_types: str = Field(
        default=DEFAULT_ENTITY_TYPES,
        description="Accepted entity types, `Name:description` separated by commas.",
    )
    relationship_types: str = Field(
        default="",
        description="Accepted relationship types (`NAME:description,...`); empty accepts any.",
    )
    max_memories_per_tenant: int = Field(
        default=1_000_000,
        ge=0,
        description="Long-term memory versions a tenant may hold (history included); 0: no cap.",
    )
    max_memories_per_user: int = Field(
        default=100_000,
        ge=0,
        description="Long-term memory versions a user may hold (history included); 0: no cap.",
    )
    outbox_repair_after_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Age after which an unfinished two-store write is rolled back by repair.",
    )
    store_retry_after_seconds: float = Field(
        default=1.0, gt=0, description="RetryInfo delay sent when a store is down."
    )
