"""The tool runner's domain: registry rules, permissions, validation and the execution flow.

Nothing here imports grpc; errors are :class:`ToolRunnerError` values that the servicer maps to
the wire form.
"""
