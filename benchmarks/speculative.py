"""Speculative decoding: per-request decode speed with and without speculation, at several
batch sizes, on a copy-heavy workload and on the nano-vllm workload; acceptance rates.

The engine runs in this process (scheduler and model runner, no gRPC). Each batch size
runs B requests submitted at once; a request's decode speed is (output tokens - 1) over
the time from its first token to its last, averaged over the requests. "off" is the same
speculating worker with a scheduler that never gives lookahead slots
(--speculative-max-batch-size 0), so both runs share one loaded model.

Copy-heavy workload: "repeat this document" prompts over paragraphs of the repository's
README, each with the document's first words already copied; with real weights (the
embedded model) the output repeats the document. Random weights copy nothing, so with
--select-copy-heavy N the benchmark draws N random prompts, runs them once without
speculation and keeps the B whose greedy outputs n-gram lookup predicts best (random
models fall into loops that lookup catches): the workload whose continuation under this
model repeats its context, which is what speculation exploits.

Nano-vllm workload: its prompts and output lengths (benchmarks/workload.py), here cut to
--nano-max-len tokens at most on CPU. Speculation's rule (services/scheduler/
speculation.py) turns it off above --speculative-max-batch-size running sequences and for
sequences whose proposals keep being rejected.

  python -m benchmarks.speculative --device cpu --batch-sizes 1,8 --max-tokens 48
  python -m benchmarks.speculative --device cuda --batch-sizes 1,8,64 --nano-batch 256 \\
      --model-config benchmarks/configs/qwen3-0.6b.json --select-copy-heavy 256
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from pagedserve.v1 import common_pb2
from tokenizers import Tokenizer

from benchmarks.arguments import benchmark_parser
from benchmarks.workload import nano_vllm_workload, write_random_model
from gpu_worker.config import WorkerConfig
from gpu_worker.speculative.ngram import lookup
from services.common.embedded_model import materialize_default_model
from services.common.speculative import SpeculativeConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.server import build_scheduler

README = Path(__file__).resolve().parent.parent / "README.md"


def parse_args(argv: list[str] | None) -> Any:
    parser = benchmark_parser(__doc__, "benchmarks/results/speculative.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    parser.add_argument("--model-config", type=Path, default=None, help="random weights of this architecture")
    parser.add_argument("--dtype", default=None, help="float32 shows whether bf16 rounding is what differs")
    parser.add_argument("--method", default="ngram", choices=["ngram", "draft"])
    parser.add_argument("--speculative-model", type=Path, default=None)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument(
        "--speculative-max-batch-size", type=int, default=SchedulerConfig.speculative_max_batch_size
    )
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--max-tokens", type=int, default=128, help="copy-heavy output tokens per request")
    parser.add_argument("--select-copy-heavy", type=int, default=0, help="random prompts to choose from")
    parser.add_argument(
        "--nano-batch", default="8", help="batch sizes of the nano-vllm rows, comma-separated"
    )
    parser.add_argument("--nano-max-len", type=int, default=1024)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternating pairs per row; the median is shown"
    )
    return parser.parse_args(argv)


def document_prompts(count: int) -> list[list[int]]:
    """'Repeat this document' prompts over README paragraphs, the copy begun, in the
    embedded model's tokens."""
    tokenizer = Tokenizer.from_file(str(materialize_default_model() / "tokenizer.json"))
    paragraphs = [p.strip() for p in README.read_text().split("\n\n") if len(p.strip()) > 300]
    prompts = []
    for i in range(count):
        document = paragraphs[i % len(paragraphs)]
        head = " ".join(document.split()[:6])
        text = (
            f"Repeat the following document exactly.\n\nDocument:\n{document}\n\nRepeated document:\n{head}"
        )
        prompts.append(tokenizer.encode(text).ids)
    return prompts


def lookup_hit_rate(prompt: list[int], output: list[int]) -> float:
    """The fraction of output tokens that n-gram lookup proposes correctly (first proposal)."""
    tokens, hits = list(prompt), 0
    for token in output:
        proposal = lookup(tokens, 1, 2, 4)
        hits += proposal == [token]
        tokens.append(token)
    return hits / max(1, len(output))


def run(runner: Any, prompts: list[list[int]], max_tokens: list[int], config: SchedulerConfig) -> dict:
    """All prompts at once; per-request decode speed, totals and acceptance."""
    scheduler = build_scheduler(config, runner.info())
    for i, prompt in enumerate(prompts):
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True)
        scheduler.add_request(str(i), prompt, sampling)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    proposed = accepted = drafts = 0
    in_flight: deque = deque()
    start = time.perf_counter()
    while scheduler.has_unfinished_requests() or in_flight:
        while len(in_flight) < scheduler.max_steps_in_flight and (step := scheduler.schedule()) is not None:
            in_flight.append((step, runner.launch_step(step.to_proto())))
        step, launched = in_flight.popleft()
        result = runner.finish_step(launched)
        now = time.perf_counter()
        for outcome in result.speculation:
            proposed += outcome.num_proposed
            accepted += outcome.num_accepted
            drafts += outcome.num_proposed > 0
        for output in scheduler.update_from_output(step, result):
            request = int(output.request_id)
            first.setdefault(request, now)
            last[request] = now
            outputs[request].extend(output.new_token_ids)
    elapsed = time.perf_counter() - start
    runner.reset()
    speeds = [
        (len(outputs[i]) - 1) / (last[i] - first[i])
        for i in outputs
        if len(outputs[i]) > 1 and last[i] > first[i]
    ]
    return {
        "decode_tok_s_per_request": sum(speeds) / len(speeds),
        "output_tok_s": sum(len(o) for o in outputs.values()) / elapsed,
        "seconds": elapsed,
        "num_steps": scheduler.num_steps,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
        "accepted_per_draft": accepted / drafts if drafts else None,
        "outputs": [outputs[i] for i in range(len(prompts))],
    }


def compare(runner: Any, prompts: list[list[int]], max_tokens: list[int], args: Any) -> dict:
    """--repeats alternating pairs of runs without and with speculation; the pair of the
    median speedup, with every pair's speedup."""
    pairs = sorted(
        (_pair(runner, prompts, max_tokens, args) for _ in range(args.repeats)),
        key=lambda pair: pair["speedup_per_request"],
    )
    return {**pairs[len(pairs) // 2], "speedups": [pair["speedup_per_request"] for pair in pairs]}


def _pair(runner: Any, prompts: list[list[int]], max_tokens: list[int], args: Any) -> dict:
    off = run(
        runner,
        prompts,
        max_tokens,
        SchedulerConfig(speculative_max_batch_size=0, num_kv_blocks=args.num_kv_blocks),
    )
    on_config = SchedulerConfig(
        speculative_max_batch_size=args.speculative_max_batch_size, num_kv_blocks=args.num_kv_blocks
    )
    on = run(runner, prompts, max_tokens, on_config)
    on_outputs, off_outputs = on.pop("outputs"), off.pop("outputs")
    differing = [i for i, (a, b) in enumerate(zip(on_outputs, off_outputs)) if a != b]
    return {
        "off": off,
        "on": on,
        "speedup_per_request": on["decode_tok_s_per_request"] / off["decode_tok_s_per_request"],
        "tokens_identical": not differing,
        # Per differing request: its output length and the index of its first difference.
        "differing": [
            (
                len(off_outputs[i]),
                next((j for j, (a, b) in enumerate(zip(on_outputs[i], off_outputs[i])) if a != b), -1),
            )
            for i in differing
        ],
    }


def warm_up(runner: Any, args: Any) -> None:
    """One short run each way before anything is timed: the first steps of each shape
    compile kernels and set up the library state that later steps reuse."""
    prompts = [[i % 50 for i in range(64)] for _ in range(2)]
    compare(runner, prompts, [2 * args.num_speculative_tokens + 4] * 2, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runner = build_runner(args)
    print(
        f"{'workload':<11} {'batch':>5} {'off tok/s/req':>13} {'on tok/s/req':>12} {'speedup':>7} "
        f"{'accept':>6} {'acc/draft':>9} same",
        flush=True,
    )
    warm_up(runner, args)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        if args.select_copy_heavy:
            prompts = copy_heavy_under_model(runner, batch, args)
        else:
            prompts = document_prompts(batch)
        rows.append(_row("copy-heavy", batch, compare(runner, prompts, [args.max_tokens] * batch, args)))
        # Written after each row, so that a run cut short keeps what it measured.
        _write(args, rows)
    for batch in [int(b) for b in args.nano_batch.split(",")]:
        nano = nano_vllm_workload(batch)
        prompts = [p[: args.nano_max_len] for p in nano.prompts]
        lengths = [min(n, args.nano_max_len) for n in nano.output_lengths]
        rows.append(_row("nano-vllm", batch, compare(runner, prompts, lengths, args)))
        _write(args, rows)


def build_runner(args: Any) -> Any:
    """The speculating model runner of the arguments, on random weights of --model-config
    or on --model (default: the embedded model)."""
    from gpu_worker.model_runner import ModelRunner

    if args.model_config is not None:
        model = write_random_model(args.model_config, Path(tempfile.mkdtemp()) / "model")
    else:
        model = args.model or materialize_default_model()
    spec = SpeculativeConfig(
        method=args.method,
        num_speculative_tokens=args.num_speculative_tokens,
        draft_model_path=args.speculative_model,
    )
    return ModelRunner(
        WorkerConfig(
            model_path=model, device=args.device, dtype=args.dtype, speculative=spec, max_model_len=4096
        )
    )


def copy_heavy_under_model(runner: Any, batch: int, args: Any) -> list[list[int]]:
    """The `batch` random prompts, of --select-copy-heavy, whose greedy outputs n-gram
    lookup predicts best."""
    rng = random.Random(0)
    count = max(batch, args.select_copy_heavy)
    candidates = [[rng.randint(0, 10000) for _ in range(64)] for _ in range(count)]
    plain = SchedulerConfig(speculative_max_batch_size=0)
    probe = run(runner, candidates, [args.max_tokens] * count, plain)
    rates = [lookup_hit_rate(p, o) for p, o in zip(candidates, probe["outputs"])]
    ranked = sorted(range(count), key=lambda i: -rates[i])[:batch]
    return [candidates[i] for i in ranked]


def _row(workload: str, batch: int, result: dict) -> dict:
    row = {"workload": workload, "batch": batch, **result}
    on, off = row["on"], row["off"]
    rate = "-" if on["acceptance_rate"] is None else f"{on['acceptance_rate']:.2f}"
    per = "-" if on["accepted_per_draft"] is None else f"{on['accepted_per_draft']:.2f}"
    same = "yes" if row["tokens_identical"] else f"{len(row['differing'])} differ"
    print(
        f"{workload:<11} {batch:>5} {off['decode_tok_s_per_request']:>13.2f} "
        f"{on['decode_tok_s_per_request']:>12.2f} {row['speedup_per_request']:>7.2f} {rate:>6} {per:>9} "
        f"{same}  {' '.join(f'{x:.2f}' for x in row['speedups']) if len(row['speedups']) > 1 else ''}",
        flush=True,
    )
    return row


def _write(args: Any, rows: list[dict]) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
