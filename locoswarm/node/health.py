"""``locoswarm health ADDR``: exit 0 when a node's gRPC health service says SERVING.

Imports only grpc, so a container HEALTHCHECK does not pay for loading torch.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", nargs="?", default="127.0.0.1:50051", help="node's gRPC HOST:PORT")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--tls-ca", type=Path, help="CA to verify a TLS node")
    p.set_defaults(func=cmd_health)


def cmd_health(a: argparse.Namespace) -> int:
    """Exit 0 when the node's standard gRPC health service says SERVING (for HEALTHCHECKs)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ca = Path(a.tls_ca).read_bytes() if a.tls_ca is not None else None

    async def check() -> int:
        if ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            channel = grpc.aio.secure_channel(a.address, creds)
        else:
            channel = grpc.aio.insecure_channel(a.address)
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="locoswarm.v1.Peer"), timeout=a.timeout
            )
            return int(reply.status)

    try:
        status = asyncio.run(check())
    except grpc.aio.AioRpcError as exc:
        print(f"locoswarm health: {a.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    serving = status == 1  # HealthCheckResponse.SERVING
    print("SERVING" if serving else f"NOT SERVING ({status})")
    return 0 if serving else 1


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="locoswarm health", description=__doc__)
    add_health_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))
