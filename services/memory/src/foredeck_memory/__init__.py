"""Foredeck memory service: working, long-term and entity memory behind foredeck.memory.v1."""
