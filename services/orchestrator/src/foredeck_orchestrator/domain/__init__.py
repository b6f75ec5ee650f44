"""The orchestrator's domain: agent runs, their journal and the agent loop; never imports grpc."""
