"""Perplexity of one model on a fixed text, unquantized and in each quantized mode: what
quantization costs in quality.

The text (benchmarks/data/perplexity.txt, about 1,000 tokens of plain English prose) is
cut into windows of --window tokens. Each window is one request asking for its prompt
logprobs, which come from the model's own logits. The perplexity is exp of the mean
negative logprob over every position a window predicts. The engine runs in this process
(scheduler and model runner, no gRPC), one model runner per mode.

Modes:
  unquantized       the checkpoint as it is, in --dtype
  fp8, int8         W8A8 (--quantization): per-channel weight scales computed at load,
                    per-token activation scales
  fp8-kv            the KV cache in float8 (--kv-cache-dtype fp8)
  fp8+fp8-kv        both
  awq, gptq         a 4-bit checkpoint made from this one: round-to-nearest, asymmetric,
                    --group-size inputs per group, packed as AutoAWQ and auto-gptq write
                    theirs (devtools/int4_checkpoints.py). It has no calibration, so it is
                    the floor of what those tools give, not their result.

Perplexity needs trained weights, so --load-format dummy makes no sense here; the
default model is the embedded SmolLM2-135M-Instruct.

  python -m benchmarks.perplexity --device cpu
  python -m benchmarks.perplexity --device cuda --model DIR --dtype bfloat16
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedserve.v1 import common_pb2
from tokenizers import Tokenizer

from benchmarks.arguments import benchmark_parser
from benchmarks.device import release_memory
from services.common.embedded_model import materialize_default_model
from services.scheduler.config import SchedulerConfig
from services.scheduler.server import build_scheduler

TEXT = Path(__file__).resolve().parent / "data" / "perplexity.txt"


@dataclass(frozen=True)
class Mode:
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    # A 4-bit checkpoint of this format is written from the model first.
    int4_format: str | None = None


MODES = {
    "unquantized": Mode(),
    "fp8": Mode(quantization="fp8"),
    "int8": Mode(quantization="int8"),
    "fp8-kv": Mode(kv_cache_dtype="fp8"),
    "fp8+fp8-kv": Mode(quantization="fp8", kv_cache_dtype="fp8"),
    "awq": Mode(int4_format="awq"),
    "gptq": Mode(int4_format="gptq"),
}


def parse_args(argv: list[str] | None) -> Any:
    parser = benchmark_parser(__doc__, "benchmarks/results/perplexity.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default=None, help="default: the worker's for the device")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--window", type=int, default=256, help="tokens per request")
    parser.add_argument("--group-size", type=int, default=64, help="inputs per 4-bit group")
    parser.add_argument("--chunk", type=int, default=64, help="prompt tokens per step")
    return parser.parse_args(argv)


def text_windows(model_dir: Path, window: int) -> list[list[int]]:
    """The text in the model's tokens, cut into windows; a last short one is kept when it
    predicts at least a few tokens."""
    tokens = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT.read_text()).ids
    windows = [tokens[start : start + window] for start in range(0, len(tokens), window)]
    return [w for w in windows if len(w) > 8]


def prompt_logprobs(runner: Any, windows: list[list[int]], chunk: int) -> list[float]:
    """The logprob of every token each window predicts (all but its first), in order.
    Each step computes at most `chunk` prompt tokens, so that all but a window's first
    chunk attend to keys read back from the KV cache, in its dtype, as a long prompt's
    later chunks and every decode step do."""
    config = SchedulerConfig(max_steps_in_flight=1, max_num_batched_tokens=chunk)
    scheduler = build_scheduler(config, runner.info())
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    for index, window in enumerate(windows):
        scheduler.add_request(str(index), window, sampling)
    by_window: dict[int, list[float]] = {}
    while scheduler.has_unfinished_requests():
        step = scheduler.schedule()
        if step is None:
            raise RuntimeError("unfinished requests but nothing to schedule")
        result = runner.finish_step(runner.launch_step(step.to_proto()))
        for output in scheduler.update_from_output(step, result):
            if output.prompt_logprobs:
                by_window[int(output.request_id)] = [entry.logprob for entry in output.prompt_logprobs]
    for index, window in enumerate(windows):
        if len(by_window.get(index, [])) != len(window) - 1:
            raise RuntimeError(
                f"window {index}: {len(by_window.get(index, []))} logprobs for {len(window)} tokens"
            )
    return [logprob for index in range(len(windows)) for logprob in by_window[index]]


@contextmanager
def model_for(mode: Mode, model_dir: Path, group_size: int) -> Iterator[Path]:
    """The model directory the mode serves: the model's own, or a 4-bit copy of it."""
    if mode.int4_format is None:
        yield model_dir
        return
    from devtools.int4_checkpoints import write_int4_checkpoint

    with tempfile.TemporaryDirectory(prefix=f"perplexity-{mode.int4_format}-") as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(model_dir, copy)
        write_int4_checkpoint(copy, mode.int4_format, group_size)
        yield copy


def measure(mode: Mode, args: Any, windows: list[list[int]]) -> dict:
    from gpu_worker.config import WorkerConfig
    from gpu_worker.model_runner import ModelRunner

    with model_for(mode, args.model, args.group_size) as model_dir:
        config = WorkerConfig(
            model_path=model_dir,
            device=args.device,
            dtype=args.dtype,
            quantization=mode.quantization,
            kv_cache_dtype=mode.kv_cache_dtype,
            max_model_len=max(len(w) for w in windows) + 1,
            swap_space_bytes=0,
            enforce_eager=True,
        )
        runner = ModelRunner(config)
        start = time.perf_counter()
        logprobs = prompt_logprobs(runner, windows, args.chunk)
        seconds = time.perf_counter() - start
        del runner
    release_memory(args.device)
    return {
        "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
        "tokens": len(logprobs),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.model = args.model or materialize_default_model()
    modes = args.modes.split(",")
    unknown = [name for name in modes if name not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    windows = text_windows(args.model, args.window)
    results = {name: measure(MODES[name], args, windows) for name in modes}
    baseline = results.get("unquantized", {}).get("perplexity")
    print(f"{'mode':<14} {'perplexity':>10} {'vs unquantized':>15} {'tokens':>7}")
    for name, result in results.items():
        if baseline:
            result["relative"] = result["perplexity"] / baseline
        ratio = f"{result['relative']:.4f}×" if baseline else "-"
        print(f"{name:<14} {result['perplexity']:>10.4f} {ratio:>15} {result['tokens']:>7}")
    summary = {
        "model": str(args.model),
        "device": args.device,
        "dtype": args.dtype,
        "window": args.window,
        "group_size": args.group_size,
        "modes": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
