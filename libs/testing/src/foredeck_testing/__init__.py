"""Foredeck's test helpers: fixtures that start real servers, and a scripted LLM provider."""
