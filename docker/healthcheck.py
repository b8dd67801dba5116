"""Container health check: exits 0 when the gRPC server at ADDRESS reports SERVING.

    python healthcheck.py [ADDRESS] [SERVICE] [TLS_DIR]

ADDRESS defaults to localhost:50051; SERVICE to "" (the whole server). With TLS_DIR the
check speaks TLS, trusting TLS_DIR/ca.crt and presenting TLS_DIR/tls.crt and tls.key (a
Kubernetes TLS Secret's layout), as a port that requires client certificates wants. Only grpcio and
grpcio-health-checking are needed, so the check works in any of the images without
importing pagedserve (and without paying for its imports every few seconds).
"""

import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def _channel(address: str, tls_dir: Path | None) -> grpc.Channel:
    if tls_dir is None:
        return grpc.insecure_channel(address)
    ca = tls_dir / "ca.crt"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca.exists() else None,
        private_key=(tls_dir / "tls.key").read_bytes(),
        certificate_chain=(tls_dir / "tls.crt").read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "localhost:50051"
    service = argv[2] if len(argv) > 2 else ""
    with _channel(address, Path(argv[3]) if len(argv) > 3 else None) as channel:
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
