"""The command-line options of an engine's group of worker ranks: how many, and where
one rank stands in it."""

import argparse

from gpu_worker.parallel.config import ParallelConfig
from services.flag_table import Flag, add_flags


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    add_flags(
        parser,
        Flag(
            "--tensor-parallel-size",
            int,
            ParallelConfig.tensor_parallel_size,
            "worker ranks each layer is split over (one GPU each)",
        ),
        Flag(
            "--pipeline-parallel-size",
            int,
            ParallelConfig.pipeline_parallel_size,
            "pipeline stages the layers are split over, each of --tensor-parallel-size ranks",
        ),
    )


def add_rank_args(parser: argparse.ArgumentParser) -> None:
    """Where one worker stands in its engine's group of ranks."""
    add_flags(
        parser,
        Flag("--rank", int, ParallelConfig.rank, "this worker's rank, stage-major"),
        Flag(
            "--dist-init-addr",
            None,
            None,
            "host:port where rank 0 meets the other ranks (torch.distributed rendezvous); "
            "required with more than one rank",
        ),
        Flag(
            "--dist-timeout",
            float,
            ParallelConfig.timeout_s,
            "seconds the ranks may take to meet, and the limit of any one collective",
        ),
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
