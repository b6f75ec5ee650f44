"""Foredeck's tool runner: the tool registry and the sandboxed execution of agents' tool calls."""
