"""Client channels between pagedserve services."""

import grpc

# Between services: step messages for large batches and long prompts outgrow gRPC's
# 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# What the public port accepts in one request (gRPC message or HTTP body). A prompt that
# fits a sequence is far smaller, and gRPC refuses a larger message from its length
# prefix, before it is read whole or parsed.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def message_size_options(max_receive_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_receive_bytes),
    ]


MESSAGE_SIZE_OPTIONS = message_size_options()

KEEPALIVE_TIME_MS = 30_000

CHANNEL_OPTIONS = [*MESSAGE_SIZE_OPTIONS, ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS)]

# The scheduler pings its workers more often: a worker that stops answering (a stopped
# process, a lost host) holds its engine's every request, and the ranks of a parallel
# engine wait for each other, so its channel must break within seconds.
WORKER_KEEPALIVE_TIME_MS = 4_000
WORKER_CHANNEL_OPTIONS = [
    *MESSAGE_SIZE_OPTIONS,
    ("grpc.keepalive_time_ms", WORKER_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", WORKER_KEEPALIVE_TIME_MS),
]

# Servers accept those keepalive pings on a stream that carries no data for a while (the
# scheduler's step stream to an idle worker). By default a server allows one every five
# minutes and answers more with GOAWAY "too_many_pings", which breaks the stream.
SERVER_KEEPALIVE_OPTIONS = [("grpc.http2.min_ping_interval_without_data_ms", WORKER_KEEPALIVE_TIME_MS // 2)]

# gRPC holds back the answer to a stream it ends with an error (a message over the size
# limit) by 0.1 to 1 s at random, to slow abusive clients down; it would delay every such
# refusal as much, while API keys and their rate limits already bound what a caller costs.
SERVER_ERROR_TARPIT_OPTIONS = [("grpc.http.tarpit", 0)]


def insecure_channel(address: str, options: list[tuple[str, int]] = CHANNEL_OPTIONS) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=options)
