"""Foredeck llmrouter: one gRPC API over Anthropic, OpenAI(-compatible) and a local model."""
