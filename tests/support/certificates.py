"""Real certificates for the TLS tests, written by the `cryptography` library: a CA, and
certificates it signs for 127.0.0.1 and localhost, good for serving and for presenting
as a client (mTLS)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.tls import TlsConfig


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def make_authority(directory: Path, name: str = "pagedserve test CA") -> Authority:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _validity(
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
    ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    certificate = builder.sign(key, hashes.SHA256())
    path = directory / "ca.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(key, certificate, path)


def issue(authority: Authority, directory: Path, name: str) -> TlsConfig:
    """A certificate and key for 127.0.0.1 and localhost, signed by `authority`, written to
    directory/NAME.pem and NAME.key; returns them with the authority's CA bundle."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    alternative_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    builder = (
        _validity(
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(authority.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
        )
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    certificate = builder.sign(authority.key, hashes.SHA256())
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    # Key first: a reader that sees the new certificate finds its key already there.
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return TlsConfig(certfile, keyfile, authority.path)


def serial_number(certfile: Path) -> int:
    return x509.load_pem_x509_certificate(certfile.read_bytes()).serial_number


def tls_flags(tls: TlsConfig) -> list[str]:
    flags = ["--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile)]
    return flags + (["--ssl-ca-certs", str(tls.ca_certs)] if tls.ca_certs is not None else [])
