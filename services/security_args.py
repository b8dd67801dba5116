"""The command-line options of TLS, API keys and the internal token, and the settings they
make. Secrets may come from the environment (PAGEDSERVE_API_KEY, PAGEDSERVE_INTERNAL_TOKEN),
read here when a command starts, never at import time, so that they stay off command
lines that `ps` shows."""

import argparse
import secrets
from collections.abc import Mapping
from pathlib import Path

from services.common.api_keys import ApiKeyFileError, ApiKeys
from services.common.tls import TlsConfig
from services.flag_table import Flag, add_flags

API_KEY_ENV = "PAGEDSERVE_API_KEY"
INTERNAL_TOKEN_ENV = "PAGEDSERVE_INTERNAL_TOKEN"


def add_tls_args(parser: argparse.ArgumentParser) -> None:
    add_flags(
        parser,
        Flag(
            "--ssl-certfile",
            Path,
            None,
            "PEM certificate chain to serve TLS with (gRPC and HTTP), also presented to the next "
            "service; read again when it changes",
        ),
        Flag("--ssl-keyfile", Path, None, "PEM private key of --ssl-certfile"),
        Flag(
            "--ssl-ca-certs",
            Path,
            None,
            "PEM CA bundle: clients must present a certificate it signed (mTLS), and the next "
            "service's certificate must be signed by it",
        ),
        Flag(
            "--ssl-server-name",
            None,
            None,
            "name the next service's certificate must carry, when it is dialled by address "
            "(the scheduler pods behind a headless Service); default: the address dialled",
        ),
    )


def add_internal_token_args(parser: argparse.ArgumentParser) -> None:
    add_flags(
        parser,
        Flag(
            "--internal-token",
            None,
            None,
            f"shared secret the services send to each other (also ${INTERNAL_TOKEN_ENV}); the "
            "scheduler and worker then answer only callers that send it or show a client certificate",
        ),
        Flag("--internal-token-file", Path, None, "file holding --internal-token"),
    )


def add_api_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"API key the public gRPC and HTTP APIs require (authorization: Bearer KEY); repeatable; "
        f"also ${API_KEY_ENV} (several separated by commas)",
    )
    parser.add_argument(
        "--api-key-file",
        action="append",
        type=Path,
        default=[],
        help="file of API keys: one per line, or TOML [[key]] tables with a name, a priority "
        "range and requests and tokens per minute (README: Security); repeatable",
    )


def add_security_args(parser: argparse.ArgumentParser, public: bool) -> None:
    """public: the service (or `serve`) answers the public API and takes its keys."""
    add_tls_args(parser)
    add_internal_token_args(parser)
    if public:
        add_api_key_args(parser)


def tls_config(args: argparse.Namespace) -> TlsConfig:
    return TlsConfig(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs, args.ssl_server_name)


def internal_token(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    if args.internal_token_file is not None:
        return args.internal_token_file.read_text().strip() or None
    return args.internal_token or env.get(INTERNAL_TOKEN_ENV) or None


def new_internal_token() -> str:
    return secrets.token_urlsafe(32)


def plain_api_keys(args: argparse.Namespace, env: Mapping[str, str]) -> list[str]:
    from_env = [key.strip() for key in env.get(API_KEY_ENV, "").split(",")]
    return [key for key in [*args.api_key, *from_env] if key]


def api_keys(args: argparse.Namespace, env: Mapping[str, str]) -> ApiKeys | None:
    """Raises SystemExit naming the file and entry when a key file is wrong."""
    try:
        return ApiKeys.load(plain_api_keys(args, env), args.api_key_file)
    except ApiKeyFileError as error:
        raise SystemExit(f"pagedserve: --api-key-file {error}") from error


def service_env(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str]:
    """The secrets every service of `pagedserve serve` gets in its environment: the internal
    token (a new random one unless given), and the plain API keys (which only the
    tokenizers read)."""
    values = {INTERNAL_TOKEN_ENV: internal_token(args, env) or new_internal_token()}
    keys = plain_api_keys(args, env)
    if keys:
        values[API_KEY_ENV] = ",".join(keys)
    return values
