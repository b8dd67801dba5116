"""How a service reaches the next one (tokenizer to scheduler, scheduler to worker): over
TLS when it serves TLS itself, presenting its own certificate and trusting the CA, and
with the internal token as its bearer when there is one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from services.common.caller_auth import AUTHORIZATION
from services.common.channels import CHANNEL_OPTIONS
from services.common.tls import TlsConfig, channel_credentials


@dataclass(frozen=True)
class PeerAccess:
    tls: TlsConfig = field(default_factory=TlsConfig)
    internal_token: str | None = field(default=None, repr=False)

    def channel(self, address: str, options: Sequence[tuple[str, int]] = CHANNEL_OPTIONS) -> grpc.aio.Channel:
        if not self.tls.enabled:
            return grpc.aio.insecure_channel(address, options=options)
        secure_options: list[tuple[str, int | str]] = [*options]
        if self.tls.server_name is not None:
            secure_options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.aio.secure_channel(address, channel_credentials(self.tls), options=secure_options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call to the peer carries (passed per call: an interceptor would cost
        the step stream an extra hop per message)."""
        if self.internal_token is None:
            return ()
        return ((AUTHORIZATION, f"Bearer {self.internal_token}"),)
