"""What a grammar mask costs: a batch of requests constrained by a JSON schema against the
same batch unconstrained, over the HTTP API, with every request generating as many tokens
in both runs (the constrained run's lengths, given to the plain run with EOS ignored), so
that only the mask differs.

    python -m benchmarks.structured_output --http http://127.0.0.1:8000 --batch 64
    python -m benchmarks.structured_output --serve --batch 8 --max-tokens 32     # CPU

Prints each run's output tokens per second and the constrained run's share of the plain
one; writes them to --json.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from benchmarks.arguments import benchmark_parser
from benchmarks.serving_clients import served_model_name
from benchmarks.serving_datasets import FIRST_TOKEN_ID, LAST_TOKEN_ID

# Nested objects, arrays, enums and bounded numbers: what a schema usually asks of the mask.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "status": {"enum": ["draft", "review", "final"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "count": {"type": "integer", "minimum": 0}},
                "required": ["name", "count"],
            },
        },
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["title", "status", "items"],
}


async def _batch(client: httpx.AsyncClient, bodies: list[dict]) -> tuple[list[int], float]:
    """Sends every body at once; each completion's token count and the batch's seconds."""

    async def one(body: dict) -> int:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(body) for body in bodies))
    return list(counts), time.perf_counter() - started


async def measure(url: str, batch: int, prompt_len: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randint(FIRST_TOKEN_ID, LAST_TOKEN_ID) for _ in range(prompt_len)] for _ in range(batch)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        model = await served_model_name(client)
        base = {"model": model, "temperature": 0}
        constrained = [
            {
                **base,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "report", "schema": SCHEMA},
                },
            }
            for prompt in prompts
        ]
        # Warm-up: the schema's grammar and the step shapes.
        await _batch(client, constrained[:2])
        counts, constrained_s = await _batch(client, constrained)
        plain = [
            {**base, "prompt": prompt, "max_tokens": count, "ignore_eos": True}
            for prompt, count in zip(prompts, counts)
        ]
        plain_counts, plain_s = await _batch(client, plain)
    assert plain_counts == counts, "the plain run generated other lengths"
    tokens = sum(counts)
    return {
        "batch": batch,
        "output_tokens": tokens,
        "constrained_tokens_per_s": tokens / constrained_s,
        "plain_tokens_per_s": tokens / plain_s,
        "constrained_share": plain_s / constrained_s,
    }


def main() -> None:
    parser = benchmark_parser(__doc__, json_default="structured_output.json")
    parser.add_argument("--http", metavar="URL", help="a running HTTP API's base URL")
    parser.add_argument("--serve", action="store_true", help="start `pagedserve serve` (CPU, embedded model)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.http
        if args.serve:
            from benchmarks.serving import build_parser, local_server

            # The serving benchmark's own defaults: a CPU stack of the embedded model.
            serve_args = build_parser().parse_args(["--serve", "--api", "http"])
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url = stack.enter_context(local_server(serve_args, ["http"], log_dir))["http"]
        if url is None:
            parser.error("give --http or --serve")
        result = asyncio.run(measure(url, args.batch, args.prompt_len, args.max_tokens, args.seed))
    print(
        f"batch {result['batch']}: {result['output_tokens']} tokens each run; "
        f"JSON schema {result['constrained_tokens_per_s']:.1f} tok/s, plain {result['plain_tokens_per_s']:.1f} "
        f"tok/s: {result['constrained_share']:.1%} of plain"
    )
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
