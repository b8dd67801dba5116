"""The HTTP API's settings and its serving state."""

import time
from dataclasses import dataclass

from services.common.channels import DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True)
class HttpApiConfig:
    # The model's id in requests and responses.
    served_model_name: str
    # Largest request body; a larger one is answered 413 before it is read whole.
    max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES


class ServingState:
    """Whether new requests are admitted, and how many are in flight (draining waits for
    them)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.created = int(time.time())
