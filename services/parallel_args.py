"""The command-line options of an engine's group of worker ranks: how many, and where
one rank stands in it."""

import argparse

from gpu_worker.parallel.config import ParallelConfig


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=ParallelConfig.tensor_parallel_size,
        help="worker ranks each layer is split over (one GPU each)",
    )
    parser.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=ParallelConfig.pipeline_parallel_size,
        help="pipeline stages the layers are split over, each of --tensor-parallel-size ranks",
    )


def add_rank_args(parser: argparse.ArgumentParser) -> None:
    """Where one worker stands in its engine's group of ranks."""
    parser.add_argument(
        "--rank", type=int, default=ParallelConfig.rank, help="this worker's rank, stage-major"
    )
    parser.add_argument(
        "--dist-init-addr",
        default=None,
        help="host:port where rank 0 meets the other ranks (torch.distributed rendezvous); "
        "required with more than one rank",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=ParallelConfig.timeout_s,
        help="seconds the ranks may take to meet, and the limit of any one collective",
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    sizes = dict(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        rank=args.rank,
        timeout_s=args.dist_timeout,
    )
    if args.dist_init_addr is None:
        world_size = args.tensor_parallel_size * args.pipeline_parallel_size
        if world_size > 1:
            raise SystemExit(
                f"pagedserve worker: --dist-init-addr is required for a world of {world_size} ranks"
            )
        return ParallelConfig(**sizes)
    host, _, port = args.dist_init_addr.rpartition(":")
    return ParallelConfig.from_address(master_addr=host.strip("[]"), master_port=int(port), **sizes)
