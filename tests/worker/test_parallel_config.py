"""Rank layout, layer split, refusals of sizes that do not split a model, and a group that
cannot form."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from parallel_harness import run_ranks

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.llama import LlamaForCausalLM
from gpu_worker.parallel.config import ParallelConfig, check_model_fits, stage_layer_range
from gpu_worker.parallel.groups import ParallelContext
from tests.support.tiny_llama import PARALLEL_DIMS

LLAMA = ModelConfig.from_dicts(dict(model_type="llama", **PARALLEL_DIMS))


def test_rank_layout_is_stage_major() -> None:
    config = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=3, rank=3)
    assert (config.world_size, config.pp_rank, config.tp_rank) == (6, 1, 1)
    assert config.tp_group_ranks(1) == [2, 3]
    assert config.pp_group_ranks(1) == [1, 3, 5]
    with pytest.raises(ValueError, match="rank 6 is outside the world of 6 ranks"):
        ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=3, rank=6)
    assert ParallelConfig.from_address(2, 1, 0, "fd00::1", 29500).init_method == "tcp://[fd00::1]:29500"


def test_layers_split_evenly_with_the_remainder_on_early_stages() -> None:
    assert [stage_layer_range(30, 2, s) for s in range(2)] == [(0, 15), (15, 30)]
    assert [stage_layer_range(10, 3, s) for s in range(3)] == [(0, 4), (4, 7), (7, 10)]


@pytest.mark.parametrize(
    ("changes", "tp", "pp", "message"),
    [
        (
            {"num_attention_heads": 9},
            2,
            1,
            "num_attention_heads 9 is not divisible by tensor_parallel_size 2",
        ),
        (
            {"num_attention_heads": 12, "num_key_value_heads": 3},
            2,
            1,
            "num_key_value_heads 3 and tensor_parallel_size 2 do not divide one another",
        ),
        (
            {"intermediate_size": 130},
            4,
            1,
            "intermediate_size 130 is not divisible by tensor_parallel_size 4",
        ),
        ({}, 1, 8, "num_hidden_layers 4 is fewer than pipeline_parallel_size 8"),
    ],
)
def test_sizes_that_do_not_split_the_model_are_refused(changes, tp: int, pp: int, message: str) -> None:
    config = dataclasses.replace(LLAMA, **changes)
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    with pytest.raises(ValueError, match=message):
        check_model_fits(config, parallel)
    # The model refuses before it allocates anything.
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        LlamaForCausalLM(config, 64, ParallelContext(config=parallel))


def test_sizes_that_split_the_model_are_accepted(embedded_model_dir) -> None:
    smollm2 = ModelConfig.from_model_dir(embedded_model_dir)
    for tp, pp in [(3, 1), (1, 2), (3, 2), (1, 30)]:
        check_model_fits(smollm2, ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp))
    # More ranks than KV heads: each KV head is replicated.
    check_model_fits(LLAMA, ParallelConfig(tensor_parallel_size=8))
    with pytest.raises(ValueError, match="num_attention_heads 9 is not divisible by tensor_parallel_size 2"):
        check_model_fits(smollm2, ParallelConfig(tensor_parallel_size=2))


def _never_called(context: ParallelContext) -> None:
    raise AssertionError("the group formed with a rank missing")


def test_a_group_missing_a_rank_fails_within_its_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(
        AssertionError, match="ParallelStartupError: rank 0 of 2 could not form its process group"
    ):
        run_ranks(_never_called, 2, only_ranks=[0], group_timeout_s=3)
    assert time.monotonic() - started < 30
