"""Foredeck Python SDK and CLI."""
