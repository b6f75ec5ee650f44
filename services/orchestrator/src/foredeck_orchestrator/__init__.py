"""Foredeck's orchestrator: durable agent runs, as an ``api`` role and a ``worker`` role."""
