"""The worker's command-line flags, which `pagedserve worker` and `pagedserve serve` share,
and the flags that choose how the weights are read and stored."""

import argparse

from gpu_worker.config import LOAD_FORMATS, WorkerConfig
from gpu_worker.model.quantization.config import QUANTIZATION_METHODS
from services.common.speculative import SPECULATIVE_METHODS, SpeculativeConfig

GIB = 1 << 30


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=WorkerConfig.device, help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--dtype",
        default=WorkerConfig.dtype,
        help="float32, bfloat16 or float16; default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--block-size", type=int, default=WorkerConfig.block_size, help="tokens per KV block")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=WorkerConfig.max_model_len,
        help="longest sequence; default: the model's",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=WorkerConfig.gpu_memory_utilization,
        help="fraction of GPU memory for weights, activations and KV cache",
    )
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    parser.add_argument(
        "--swap-space",
        type=float,
        default=WorkerConfig.swap_space_bytes / GIB,
        help="GiB of host memory for the CPU swap pool (--preemption-mode swap); 0: none",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=WorkerConfig.max_num_seqs,
        help="most sequences in one step: the largest decode batch captured in a CUDA graph; "
        "the scheduler adopts it",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=WorkerConfig.max_num_batched_tokens,
        help="most tokens in one step, profiled to size the KV cache; the scheduler adopts it",
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
    parser.add_argument(
        "--speculative-model",
        default=SpeculativeConfig.draft_model_path,
        help="the draft model's directory (same tokenizer); implies --speculative-method draft",
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=SpeculativeConfig.num_speculative_tokens,
        help="tokens proposed per sequence and step at most",
    )
    parser.add_argument(
        "--prompt-lookup-max",
        type=int,
        default=SpeculativeConfig.prompt_lookup_max,
        help="n-gram lookup: the longest suffix of a sequence looked up earlier in it",
    )
    parser.add_argument(
        "--prompt-lookup-min",
        type=int,
        default=SpeculativeConfig.prompt_lookup_min,
        help="n-gram lookup: the shortest suffix looked up",
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
        "--load-format",
        choices=LOAD_FORMATS,
        default=WorkerConfig.load_format,
        help="dummy: random weights with the config's shapes, for benchmarks",
    )


def forwarded_weight_flags(args: argparse.Namespace) -> list[str]:
    """add_weight_args' flags as `pagedserve serve` passes them on to each worker."""
    flags = ["--load-format", args.load_format]
    if args.quantization is not None:
        flags += ["--quantization", args.quantization]
    return flags
