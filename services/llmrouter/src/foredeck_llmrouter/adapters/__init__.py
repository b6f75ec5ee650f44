"""Implementations of the domain's ports: provider SDKs, the local model, Redis, telemetry."""
