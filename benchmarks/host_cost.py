"""What the host does per step, with no device work to hide it: the in-process engine
(scheduler and worker on one thread, three steps in flight) on the nano-vllm workload,
on CPU, with the model's forward and LM head stubbed out. Prints milliseconds per step
of planning, building and launching, waiting and applying tokens, and how long building
a step's inputs takes by batch size.

    python -m benchmarks.host_cost [--num-seqs 256] [--json host_cost.json]
    python -m benchmarks.host_cost --num-seqs 600 --min-len 20 --max-len 200   # short requests

On the GPU these are what must fit inside the device's own step time (about 1 ms for one
sequence, 8 ms for 256) for the device never to wait on the host. The model is a
one-layer Qwen3 with random weights, there only for the worker to load; its forward
returns zeros and its logits are one zero per row, so every (greedy) sequence samples
token 0, which the workload ignores as it ignores EOS. The build times include the
warm-up's dozen steps of one or two sequences.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.arguments import benchmark_parser
from benchmarks.engine_settings import EngineSettings
from benchmarks.pagedserve_runs import run_in_process
from benchmarks.workload import QWEN3_CONFIG, nano_vllm_workload, write_random_model
from gpu_worker.input_batch import StepInputBuilder
from gpu_worker.model.llama import LlamaForCausalLM
from gpu_worker.model_runner import ModelRunner

# Small enough that loading it costs nothing; the vocabulary holds the workload's ids.
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_hidden_layers=1,
    max_window_layers=1,
    vocab_size=10240,
    bos_token_id=0,
    eos_token_id=10239,
    torch_dtype="float32",
)


def tiny_model(scratch: Path) -> Path:
    config = json.loads(QWEN3_CONFIG.read_text()) | TINY
    path = scratch / "tiny-qwen3.json"
    path.write_text(json.dumps(config))
    return write_random_model(path, scratch / "model")


def stub_model_and_time_builds() -> dict[int, list[float]]:
    """Replaces the forward and the LM head with zeros; returns the seconds of every
    input build, by batch size, as they happen."""
    builds: dict[int, list[float]] = defaultdict(list)
    build = StepInputBuilder.build

    def timed_build(self, scheduled, sequences, *args, **kwargs):
        start = time.perf_counter()
        inputs = build(self, scheduled, sequences, *args, **kwargs)
        builds[len(scheduled)].append(time.perf_counter() - start)
        return inputs

    def zero_forward(self, batch):
        # As ModelRunner._forward: the hidden states, and whether a graph computed them.
        return torch.zeros(batch.input_ids.shape[0], TINY["hidden_size"]), False

    def zero_logits(self, hidden_states):
        return torch.zeros(hidden_states.shape[0], 1)

    # Replaced for the rest of this process, on purpose.
    StepInputBuilder.build = timed_build  # type: ignore[method-assign]
    ModelRunner._forward = zero_forward  # type: ignore[method-assign]
    LlamaForCausalLM.compute_logits = zero_logits  # type: ignore[method-assign]
    return builds


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "host_cost.json")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100, help="prompt and output lengths, as nano-vllm's")
    parser.add_argument("--max-len", type=int, default=1024)
    args = parser.parse_args(argv)
    builds = stub_model_and_time_builds()
    settings = EngineSettings(device="cpu", max_model_len=4096, swap_space=0)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = tiny_model(Path(scratch))
        workload = nano_vllm_workload(args.num_seqs, args.min_len, args.max_len)
        (result,) = run_in_process(model_dir, workload, settings, [3])
    steps = result.profile["steps"]
    per_step = {
        part: 1e3 * result.profile[f"{part}_s"] / steps for part in ("schedule", "launch", "finish", "update")
    }
    by_batch: dict[int, list[float]] = defaultdict(list)
    for batch_size, seconds in builds.items():
        by_batch[1 << (batch_size - 1).bit_length()].extend(seconds)
    build_us = {size: 1e6 * sorted(times)[len(times) // 2] for size, times in sorted(by_batch.items())}
    summary = {
        "num_seqs": args.num_seqs,
        "steps": steps,
        "seconds": result.seconds,
        "ms_per_step": per_step,
        "median_build_us_by_batch_up_to": build_us,
    }
    args.json.write_text(json.dumps(summary, indent=2))
    print(
        f"{steps:.0f} steps in {result.seconds:.2f} s; ms per step: "
        + ", ".join(f"{part} {ms:.3f}" for part, ms in per_step.items())
    )
    print(
        "input build, median us by batch size (up to): "
        + "  ".join(f"{size}: {us:.0f}" for size, us in build_us.items())
    )


if __name__ == "__main__":
    main()
