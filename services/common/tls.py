"""TLS on every hop: the one set of certificate files a service serves with and, as a client
of the next service, presents and trusts. With a CA the peers must show a certificate it
signed (mTLS). Servers read the files again whenever they change, so certificates rotate
without a restart."""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """The TLS files given do not make a usable configuration."""


@dataclass(frozen=True)
class TlsConfig:
    # PEM certificate chain and private key this service serves with and, as a client of
    # the next service, presents.
    certfile: Path | None = None
    keyfile: Path | None = None
    # PEM CA bundle: peers' certificates must be signed by it, clients' included (mTLS).
    # None: servers ask for no client certificate, clients trust the system's roots.
    ca_certs: Path | None = None
    # The name the next service's certificate is checked against instead of the address
    # dialled: addresses resolved from a DNS name (a headless Service's pod IPs) are in no
    # certificate. None: the address itself.
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise TlsConfigError("--ssl-certfile and --ssl-keyfile go together")
        if self.ca_certs is not None and self.certfile is None:
            raise TlsConfigError("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile")

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    @property
    def requires_client_certificate(self) -> bool:
        return self.ca_certs is not None

    def files(self) -> list[Path]:
        return [path for path in (self.certfile, self.keyfile, self.ca_certs) if path is not None]


class CertificateFiles:
    """The files as last read, read again when one of their modification times changes. A
    half-written rotation (a key that does not match its certificate, a file that does not
    parse) keeps the previous certificates until the files are whole again."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._stamp: tuple[int, ...] | None = None

    def _current_stamp(self) -> tuple[int, ...]:
        return tuple(os.stat(path).st_mtime_ns for path in self.config.files())

    def changed(self) -> bool:
        try:
            return self._current_stamp() != self._stamp
        except OSError:
            return False

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, key, CA bundle or None), checked to belong together; raises
        TlsConfigError when they do not, and remembers them as the current ones."""
        config = self.config
        assert config.certfile is not None and config.keyfile is not None
        try:
            stamp = self._current_stamp()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(config.certfile, config.keyfile)
            if config.ca_certs is not None:
                context.load_verify_locations(config.ca_certs)
            chain, key = config.certfile.read_bytes(), config.keyfile.read_bytes()
            ca = config.ca_certs.read_bytes() if config.ca_certs is not None else None
        except (OSError, ssl.SSLError) as error:
            raise TlsConfigError(f"TLS files {', '.join(map(str, config.files()))}: {error}") from error
        self._stamp = stamp
        return chain, key, ca

    def fetch_server_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks this before handshakes: a new configuration when the files changed,
        None to keep the current one."""
        if not self.changed():
            return None
        try:
            chain, key, ca = self.read()
        except TlsConfigError as error:
            log.warning("keeping the current certificates: %s", error)
            return None
        log.info("certificates reloaded from %s", self.config.certfile)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """Credentials that serve the files' certificate, reloaded when the files change, and
    require a client certificate signed by the CA when there is one."""
    files = CertificateFiles(config)
    chain, key, ca = files.read()
    initial = grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)
    return grpc.dynamic_ssl_server_credentials(
        initial, files.fetch_server_configuration, require_client_authentication=ca is not None
    )


def channel_credentials(config: TlsConfig) -> grpc.ChannelCredentials:
    """A client's side: trust the CA (the system's roots without one) and present the
    service's own certificate. Read when a channel opens; a channel keeps what it read."""
    chain, key, ca = CertificateFiles(config).read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def reload_if_changed(context: ssl.SSLContext, files: CertificateFiles) -> None:
    """Swaps the certificate of a server SSLContext (the HTTP API's) in place when the files
    changed: the connections that follow get the new one."""
    if not files.changed():
        return
    try:
        files.read()
    except TlsConfigError as error:
        log.warning("keeping the current certificates: %s", error)
        return
    config = files.config
    context.load_cert_chain(str(config.certfile), str(config.keyfile))
    if config.ca_certs is not None:
        context.load_verify_locations(str(config.ca_certs))
    log.info("HTTP API certificates reloaded from %s", config.certfile)
