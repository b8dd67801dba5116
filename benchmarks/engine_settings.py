"""The engine settings the pagedserve benchmark runs vary, and their command-line options:
the worker's own (`pagedserve worker`'s, with their defaults), then the scheduler's."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gpu_worker.config import MAX_STEPS_LAUNCHED, WorkerConfig
from services.parallel_args import add_parallel_args
from services.scheduler.config import SchedulerConfig
from services.worker_flags import GIB, add_worker_args


@dataclass(frozen=True)
class EngineSettings:
    device: str
    max_num_seqs: int = WorkerConfig.max_num_seqs
    max_num_batched_tokens: int = WorkerConfig.max_num_batched_tokens
    gpu_memory_utilization: float = WorkerConfig.gpu_memory_utilization
    max_model_len: int | None = None
    enforce_eager: bool = False
    prefill_graphs: bool = WorkerConfig.prefill_graphs
    block_size: int = WorkerConfig.block_size
    # The scheduler's max_steps_in_flight: 1, no overlap; by default the worker's depth.
    max_steps_in_flight: int = MAX_STEPS_LAUNCHED
    # GiB, as `pagedserve worker --swap-space` takes it.
    swap_space: float = WorkerConfig.swap_space_bytes / GIB
    # The worker's --dtype; None: its default for the device.
    dtype: str | None = None
    # The scheduler service's --max-stream-messages-per-step (0: no limit).
    max_stream_messages_per_step: int | None = SchedulerConfig.max_stream_messages_per_step
    # Where the worker writes its step timeline (gpu_worker/step_timeline.py), one file per
    # engine; None: no timeline.
    step_timeline_dir: Path | None = None
    # The engine's ranks (gRPC runs only: in-process runs hold one).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # The worker's --load-format ("dummy": random weights, no checkpoint read) and
    # --quantization.
    load_format: str = WorkerConfig.load_format
    quantization: str | None = None
    # The worker's --kv-cache-dtype ("fp8": a float8 cache).
    kv_cache_dtype: str = WorkerConfig.kv_cache_dtype
    # The scheduler's --admission-batch-tokens (0: newcomers join as soon as they fit).
    admission_batch_tokens: int = SchedulerConfig.admission_batch_tokens
    # The scheduler's --max-prompt-tokens-with-decodes (0: no cap) and what it grows by
    # per decoding sequence.
    max_prompt_tokens_with_decodes: int | None = SchedulerConfig.max_prompt_tokens_with_decodes
    prompt_tokens_per_decode: int = SchedulerConfig.prompt_tokens_per_decode
    # Tokenizer processes sharing the gRPC run's port (gRPC runs only).
    tokenizers: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineSettings:
        """The settings whose fields `args` carry (add_engine_args names them so), the
        others at their defaults, then `overrides`."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **overrides})


def add_engine_args(parser: argparse.ArgumentParser, max_model_len: int | None = None) -> None:
    """The engine's options: the worker's own (`pagedserve worker`'s, with their defaults),
    then the scheduler's that the benchmarks vary."""
    add_worker_args(parser)
    add_parallel_args(parser)
    parser.set_defaults(device="cuda", max_model_len=max_model_len)
    parser.add_argument(
        "--max-steps-in-flight", type=int, default=EngineSettings.max_steps_in_flight, help="with overlap on"
    )
    parser.add_argument(
        "--max-stream-messages-per-step",
        type=int,
        default=EngineSettings.max_stream_messages_per_step,
        help="the scheduler service's limit in the gRPC runs (0: no limit)",
    )
    help = "the scheduler's: a full batch lets newcomers in once they bring this many tokens (0: at once)"
    parser.add_argument(
        "--admission-batch-tokens", type=int, default=EngineSettings.admission_batch_tokens, help=help
    )
    parser.add_argument(
        "--max-prompt-tokens-with-decodes",
        type=int,
        default=EngineSettings.max_prompt_tokens_with_decodes,
        help="the scheduler's cap on prompt tokens in a step that decodes (0: none)",
    )
    parser.add_argument(
        "--prompt-tokens-per-decode",
        type=int,
        default=EngineSettings.prompt_tokens_per_decode,
        help="what that cap grows by per decoding sequence",
    )
    parser.add_argument(
        "--tokenizers",
        type=int,
        default=EngineSettings.tokenizers,
        help="tokenizer processes in the gRPC runs",
    )
    parser.add_argument(
        "--step-timeline",
        dest="step_timeline_dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="directory for the pagedserve runs' worker step timelines; their summary goes "
        "into the table and the JSON (benchmarks/step_timeline.py)",
    )
