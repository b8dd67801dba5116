"""Client channels between pagedserve services."""

import grpc

# Step messages for large batches and long prompts outgrow gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

CHANNEL_OPTIONS = [*MESSAGE_SIZE_OPTIONS, ("grpc.keepalive_time_ms", 30_000)]


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
