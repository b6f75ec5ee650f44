"""Foredeck's gateway: the public edge that authenticates, admits and routes calls."""
