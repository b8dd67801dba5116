"""Runs a function on every rank of a small engine, one process per rank, over gloo on CPU.

Each rank joins the real torch.distributed groups through gpu_worker.parallel.init_parallel,
runs `target(context, *args)` and sends back what it returns (tensors included); a rank that
raises sends its traceback, which fails the calling test.
"""

from __future__ import annotations

import pickle
import queue
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from gpu_worker.parallel.config import ParallelConfig
from gpu_worker.parallel.groups import close_parallel, init_parallel
from services.launcher import free_port


def _process_context() -> Any:
    """Ranks fork from one server process that has imported torch and the model code once,
    instead of each importing them (seconds apiece on a small machine); unlike a plain fork
    of the test process, none of them inherits a thread pool that torch has started."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "torch.distributed", "gpu_worker.model.loader", "parallel_harness"]
    )
    return context


def _rank_main(
    target: Callable[..., Any], config: ParallelConfig, args: tuple[Any, ...], results: mp.Queue
) -> None:
    # Two cores are shared by every rank: one thread each keeps them from fighting.
    torch.set_num_threads(1)
    try:
        context = init_parallel(config, torch.device("cpu"))
        try:
            outcome: tuple[str, Any] = ("ok", target(context, *args))
        finally:
            close_parallel()
    except BaseException:
        outcome = ("error", traceback.format_exc())
    # Plain pickle copies tensors into the message: shared-memory handles would die with
    # this process.
    results.put((config.rank, pickle.dumps(outcome)))


def run_ranks(
    target: Callable[..., Any],
    tensor_parallel_size: int,
    pipeline_parallel_size: int = 1,
    args: Sequence[Any] = (),
    timeout_s: float = 60.0,
    only_ranks: Sequence[int] | None = None,
    group_timeout_s: float = 30.0,
) -> list[Any]:
    """target's result on each rank, in rank order (of `only_ranks` when given, which starts
    just those ranks of the world)."""
    world_size = tensor_parallel_size * pipeline_parallel_size
    ranks = list(range(world_size)) if only_ranks is None else list(only_ranks)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = _process_context()
    results = context.Queue()
    processes = []
    for rank in ranks:
        config = ParallelConfig(
            tensor_parallel_size, pipeline_parallel_size, rank, init_method, timeout_s=group_timeout_s
        )
        process = context.Process(target=_rank_main, args=(target, config, tuple(args), results))
        process.start()
        processes.append(process)
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        for _ in ranks:
            rank, message = results.get(timeout=timeout_s)
            outcomes[rank] = pickle.loads(message)
    except queue.Empty:
        raise AssertionError(
            f"ranks {sorted(set(ranks) - set(outcomes))} did not finish in {timeout_s} s"
        ) from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    errors = [f"rank {rank}:\n{value}" for rank, (kind, value) in sorted(outcomes.items()) if kind == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [outcomes[rank][1] for rank in ranks]
