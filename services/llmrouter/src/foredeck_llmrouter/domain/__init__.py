"""The router's domain: models, routing, retries and failures; no gRPC here."""
