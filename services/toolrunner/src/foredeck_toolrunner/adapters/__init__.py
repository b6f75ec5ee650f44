"""Implementations of the domain's ports: Redis storage, the sandbox and tool runtimes."""
