"""The worker's command-line flags, which `pagedserve worker` and `pagedserve serve` share,
and the flags that choose how the weights are read and stored."""

import argparse

from gpu_worker.config import KV_CACHE_DTYPES, LOAD_FORMATS, WorkerConfig
from gpu_worker.model.quantization.config import QUANTIZATION_METHODS
from services.common.speculative import SPECULATIVE_METHODS, SpeculativeConfig
from services.flag_table import Flag, add_flags

GIB = 1 << 30


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    add_flags(
        parser,
        Flag("--device", None, WorkerConfig.device, "cpu, cuda, cuda:N or auto"),
        Flag(
            "--dtype",
            None,
            WorkerConfig.dtype,
            "float32, bfloat16 or float16; default: float32 on CPU, bfloat16 on CUDA",
        ),
        Flag("--block-size", int, WorkerConfig.block_size, "tokens per KV block"),
        Flag("--max-model-len", int, WorkerConfig.max_model_len, "longest sequence; default: the model's"),
        Flag(
            "--gpu-memory-utilization",
            float,
            WorkerConfig.gpu_memory_utilization,
            "fraction of GPU memory for weights, activations and KV cache",
        ),
    )
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every step eager")
    parser.add_argument(
        "--prefill-graphs",
        action=argparse.BooleanOptionalAction,
        default=WorkerConfig.prefill_graphs,
        help="CUDA graphs for steps with prompt tokens too, up to 2,048 tokens (decode steps always have theirs)",
    )
    add_flags(
        parser,
        Flag(
            "--swap-space",
            float,
            WorkerConfig.swap_space_bytes / GIB,
            "GiB of host memory for the CPU swap pool (--preemption-mode swap); 0: none",
        ),
        Flag(
            "--max-num-seqs",
            int,
            WorkerConfig.max_num_seqs,
            "most sequences in one step: the largest decode batch captured in a CUDA graph; "
            "the scheduler adopts it",
        ),
        Flag(
            "--max-num-batched-tokens",
            int,
            WorkerConfig.max_num_batched_tokens,
            "most tokens in one step, profiled to size the KV cache; the scheduler adopts it",
        ),
    )
    add_weight_args(parser)
    add_speculative_args(parser)


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speculative-method",
        choices=SPECULATIVE_METHODS,
        default=SpeculativeConfig.method,
        help="propose tokens by n-gram prompt lookup or with a draft model (--speculative-model) "
        "and verify them in one forward; default: no speculation",
    )
    add_flags(
        parser,
        Flag(
            "--speculative-model",
            None,
            SpeculativeConfig.draft_model_path,
            "the draft model's directory (same tokenizer); implies --speculative-method draft",
        ),
        Flag(
            "--num-speculative-tokens",
            int,
            SpeculativeConfig.num_speculative_tokens,
            "tokens proposed per sequence and step at most",
        ),
        Flag(
            "--prompt-lookup-max",
            int,
            SpeculativeConfig.prompt_lookup_max,
            "n-gram lookup: the longest suffix of a sequence looked up earlier in it",
        ),
        Flag(
            "--prompt-lookup-min",
            int,
            SpeculativeConfig.prompt_lookup_min,
            "n-gram lookup: the shortest suffix looked up",
        ),
    )


def speculative_config(args: argparse.Namespace) -> SpeculativeConfig:
    return SpeculativeConfig(
        method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens,
        prompt_lookup_max=args.prompt_lookup_max,
        prompt_lookup_min=args.prompt_lookup_min,
        draft_model_path=args.speculative_model,
    )


def forwarded_speculative_flags(args: argparse.Namespace) -> list[str]:
    """add_speculative_args' flags as `pagedserve serve` passes them on to each worker."""
    flags = [
        "--num-speculative-tokens",
        str(args.num_speculative_tokens),
        "--prompt-lookup-max",
        str(args.prompt_lookup_max),
        "--prompt-lookup-min",
        str(args.prompt_lookup_min),
    ]
    if args.speculative_method is not None:
        flags += ["--speculative-method", args.speculative_method]
    if args.speculative_model is not None:
        flags += ["--speculative-model", str(args.speculative_model)]
    return flags


def add_weight_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATION_METHODS,
        default=WorkerConfig.quantization,
        help="int8 or fp8: W8A8 quantized at load time; awq or gptq: a 4-bit checkpoint; "
        "default: as the checkpoint's quantization_config says",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=WorkerConfig.kv_cache_dtype,
        help="auto: the model's dtype; fp8: float8 e4m3 (scale 1.0), half the bytes of bf16 per token",
    )
    parser.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default=WorkerConfig.load_format,
        help="dummy: random weights with the config's shapes, for benchmarks",
    )


def forwarded_weight_flags(args: argparse.Namespace) -> list[str]:
    """add_weight_args' flags as `pagedserve serve` passes them on to each worker."""
    flags = ["--load-format", args.load_format, "--kv-cache-dtype", args.kv_cache_dtype]
    if args.quantization is not None:
        flags += ["--quantization", args.quantization]
    return flags
