"""Implementations of the domain's ports: Redis, Qdrant Edge, qdrant-client, Neo4j, embedders."""
