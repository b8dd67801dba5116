"""The command-line options of the tokenizer tier: its HTTP API, the engines it routes to,
and how many engines and tokenizers `pagedserve serve` runs."""

import argparse

from services.common.channels import DEFAULT_MAX_REQUEST_BYTES
from services.flag_table import Flag, add_flags


def add_http_api_args(parser: argparse.ArgumentParser) -> None:
    """The OpenAI-compatible HTTP API that the tokenizer serves beside its gRPC API."""
    add_flags(
        parser,
        Flag("--http-port", int, None, "serve the OpenAI-compatible HTTP API on this port"),
        Flag(
            "--served-model-name", None, None, "the model's id on the HTTP API; default: its directory name"
        ),
    )


def add_generation_config_arg(parser: argparse.ArgumentParser) -> None:
    """Where the sampling defaults of requests that leave a field unset come from."""
    parser.add_argument(
        "--generation-config",
        choices=["auto", "none"],
        default="auto",
        help="auto: the model's generation_config.json (temperature, top_p, top_k, min_p, "
        "repetition_penalty) fills what a request leaves unset; none: the API's own defaults",
    )


def add_request_limit_args(parser: argparse.ArgumentParser) -> None:
    """Bounds on what one public request may make the tokenizer read."""
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest gRPC message or HTTP body a client may send; larger ones are refused "
        "(RESOURCE_EXHAUSTED, HTTP 413) before they are parsed",
    )


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """How many engines and tokenizer processes `pagedserve serve` runs."""
    add_flags(
        parser,
        Flag(
            "--engines",
            int,
            1,
            "model replicas, each a scheduler and its worker ranks (on CUDA, each on its own GPUs)",
        ),
        Flag("--tokenizers", int, 1, "tokenizer processes sharing the public ports (SO_REUSEPORT)"),
    )


def add_engine_target_args(parser: argparse.ArgumentParser) -> None:
    """The engines a tokenizer routes requests to."""
    parser.add_argument(
        "--scheduler",
        action="append",
        required=True,
        help="scheduler address, host:port, or dns:///name:port for every address of a name "
        "(resolved again every few seconds); once per engine",
    )
    parser.add_argument(
        "--routing-policy",
        choices=["prefix", "round_robin"],
        default="prefix",
        help="prefix: the engine caching the longest prefix unless overloaded, else the least "
        "loaded; round_robin: each engine in turn",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the gRPC and HTTP ports with other tokenizer processes (SO_REUSEPORT)",
    )
