"""The memory service's domain: models, use cases, ports and errors; no gRPC here."""
