"""Container health check: asks the service's standard gRPC health service whether it serves.

Images run it as their ``HEALTHCHECK``; it needs nothing but the grpcio and
grpcio-health-checking packages every Foredeck image already has, so no probe binary is
added to the image. The port comes from the service's own port variable, so the check
follows a port changed at run time::

    python healthcheck.py --port-env FOREDECK_MEMORY_PORT [--service NAME] [--timeout 3]

Exit status 0 when the answer is SERVING, 1 otherwise (not serving, unreachable, timeout).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """Ask ``address`` for the health of ``service`` ("" is the server as a whole)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return False, f"health check failed: {code.name if code else 'error'}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a Foredeck service's gRPC health.")
    parser.add_argument("--port-env", help="variable holding the gRPC port")
    parser.add_argument("--port", type=int, default=50051, help="port when --port-env is unset")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service", default="", help="health service name; '' = whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    port = args.port
    if args.port_env and os.environ.get(args.port_env):
        port = int(os.environ[args.port_env])
    ok, status = check(f"{args.host}:{port}", args.service, args.timeout)
    print(status, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
