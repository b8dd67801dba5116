"""The worker's command-line flags, which `pagedserve worker` and `pagedserve serve` share,
and the flags that choose how the weights are read and stored."""

import argparse

from gpu_worker.config import LOAD_FORMATS, WorkerConfig
from gpu_worker.model.quantization.config import QUANTIZATION_METHODS

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
