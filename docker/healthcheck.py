"""Container health check: exits 0 when the gRPC server at ADDRESS reports SERVING.

    python healthcheck.py [ADDRESS] [SERVICE]

ADDRESS defaults to localhost:50051; SERVICE to "" (the whole server). Only grpcio and
grpcio-health-checking are needed, so the check works in any of the images without
importing pagedserve (and without paying for its imports every few seconds).
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "localhost:50051"
    service = argv[2] if len(argv) > 2 else ""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
