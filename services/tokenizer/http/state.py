"""The HTTP API's settings and its serving state."""

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class HttpApiConfig:
    # The model's id in requests and responses.
    served_model_name: str


class ServingState:
    """Whether new requests are admitted, and how many are in flight (draining waits for
    them)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.created = int(time.time())
