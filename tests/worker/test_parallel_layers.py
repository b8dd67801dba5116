"""Each tensor-parallel layer against its unsharded self, on two gloo ranks.

Every rank builds the layer from its group, loads the full checkpoint tensors through the
parameters' weight_loader, and runs the same input. The output must be the unsharded
layer's (on every rank where the layer all-reduces or all-gathers, or in the rank's own
columns where it does not), and the shards of all ranks together must be the checkpoint.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from parallel_harness import run_ranks
from torch import nn

from gpu_worker.model.parallel_layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    merged_column_parallel_linear,
    qkv_parallel_linear,
)
from gpu_worker.parallel.groups import ParallelContext

TP = 2
HIDDEN = 16
HEAD_DIM = 4
NUM_HEADS = 4
VOCAB = 11  # not a multiple of TP: the last rank's slice is padded


def _checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "x": rand(5, HIDDEN),
        "column.weight": rand(12, HIDDEN),
        "column.bias": rand(12),
        "gate": rand(24, HIDDEN),
        "up": rand(24, HIDDEN),
        "gate_bias": rand(24),
        "up_bias": rand(24),
        "q": rand(NUM_HEADS * HEAD_DIM, HIDDEN),
        "k2": rand(2 * HEAD_DIM, HIDDEN),
        "v2": rand(2 * HEAD_DIM, HIDDEN),
        "k1": rand(HEAD_DIM, HIDDEN),
        "v1": rand(HEAD_DIM, HIDDEN),
        "row.weight": rand(HIDDEN, 24),
        "row.bias": rand(HIDDEN),
        "row_x": rand(5, 24),
        "embedding": rand(VOCAB, HIDDEN),
        "input_ids": torch.tensor([0, 5, 6, 10, 3, 10]),
    }


def _load(layer: nn.Module, name: str, tensor: torch.Tensor, shard_id: str | None = None) -> None:
    param = getattr(layer, name)
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


def _rank_layers(context: ParallelContext, ckpt: dict[str, torch.Tensor]) -> dict[str, Any]:
    tp, x = context.tp, ckpt["x"]
    out: dict[str, Any] = {}
    column = ColumnParallelLinear(HIDDEN, 12, bias=True, tp=tp)
    _load(column, "weight", ckpt["column.weight"])
    _load(column, "bias", ckpt["column.bias"])
    out["column"] = (column.weight.clone(), column.bias.clone(), column(x))

    gate_up = merged_column_parallel_linear(HIDDEN, [("gate", 24), ("up", 24)], bias=True, tp=tp)
    for shard in ("gate", "up"):
        _load(gate_up, "weight", ckpt[shard], shard)
        _load(gate_up, "bias", ckpt[f"{shard}_bias"], shard)
    out["gate_up"] = (gate_up.weight.clone(), gate_up.bias.clone(), gate_up(x))

    for num_kv_heads in (2, 1):
        qkv = qkv_parallel_linear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv_heads, tp=tp)
        _load(qkv, "weight", ckpt["q"], "q")
        _load(qkv, "weight", ckpt[f"k{num_kv_heads}"], "k")
        _load(qkv, "weight", ckpt[f"v{num_kv_heads}"], "v")
        sizes = [size for _, size in qkv.shard_offsets.values()]
        out[f"qkv{num_kv_heads}"] = (qkv.weight.clone().split(sizes), qkv.split(qkv(x)))

    row = RowParallelLinear(24, HIDDEN, bias=True, tp=tp)
    _load(row, "weight", ckpt["row.weight"])
    _load(row, "bias", ckpt["row.bias"])
    local_x = ckpt["row_x"].chunk(tp.size, dim=1)[tp.rank]
    out["row"] = (row.weight.clone(), row(local_x))

    embedding = VocabParallelEmbedding(VOCAB, HIDDEN, tp)
    _load(embedding, "weight", ckpt["embedding"])
    out["embedding"] = (embedding.weight.clone(), embedding(ckpt["input_ids"]))
    tied = ParallelLMHead(VOCAB, HIDDEN, tied_to=embedding, tp=tp)
    own = ParallelLMHead(VOCAB, HIDDEN, tp=tp)
    _load(own, "weight", ckpt["embedding"])
    out["lm_head"] = (own.weight.clone(), own(x), tied(x))
    return out


@pytest.fixture(scope="module")
def sharded() -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    ckpt = _checkpoint()
    return ckpt, run_ranks(_rank_layers, TP, args=(ckpt,))


def test_column_parallel(sharded) -> None:
    ckpt, ranks = sharded
    weights, biases, outputs = zip(*(r["column"] for r in ranks))
    assert torch.equal(torch.cat(weights), ckpt["column.weight"])
    assert torch.equal(torch.cat(biases), ckpt["column.bias"])
    expected = F.linear(ckpt["x"], ckpt["column.weight"], ckpt["column.bias"])
    torch.testing.assert_close(torch.cat(outputs, dim=-1), expected)


def test_merged_gate_up(sharded) -> None:
    ckpt, ranks = sharded
    for rank, r in enumerate(ranks):
        weight, bias, output = r["gate_up"]
        rows = slice(rank * 12, (rank + 1) * 12)
        assert torch.equal(weight, torch.cat([ckpt["gate"][rows], ckpt["up"][rows]]))
        assert torch.equal(bias, torch.cat([ckpt["gate_bias"][rows], ckpt["up_bias"][rows]]))
        gate, up = output.chunk(2, dim=-1)
        torch.testing.assert_close(gate, F.linear(ckpt["x"], ckpt["gate"], ckpt["gate_bias"])[:, rows])
        torch.testing.assert_close(up, F.linear(ckpt["x"], ckpt["up"], ckpt["up_bias"])[:, rows])


def test_qkv_splits_heads(sharded) -> None:
    ckpt, ranks = sharded
    weights = [r["qkv2"][0] for r in ranks]
    for index, name in enumerate(("q", "k2", "v2")):
        assert torch.equal(torch.cat([w[index] for w in weights]), ckpt[name])
        outputs = torch.cat([r["qkv2"][1][index] for r in ranks], dim=-1)
        torch.testing.assert_close(outputs, F.linear(ckpt["x"], ckpt[name]))


def test_qkv_replicates_kv_heads_when_fewer_than_ranks(sharded) -> None:
    ckpt, ranks = sharded
    assert torch.equal(torch.cat([r["qkv1"][0][0] for r in ranks]), ckpt["q"])
    for rank in ranks:
        (_, k, v), (_, k_out, v_out) = rank["qkv1"]
        # The one KV head is on both ranks, whole.
        assert torch.equal(k, ckpt["k1"]) and torch.equal(v, ckpt["v1"])
        torch.testing.assert_close(k_out, F.linear(ckpt["x"], ckpt["k1"]))
        torch.testing.assert_close(v_out, F.linear(ckpt["x"], ckpt["v1"]))


def test_row_parallel_all_reduces(sharded) -> None:
    ckpt, ranks = sharded
    assert torch.equal(torch.cat([r["row"][0] for r in ranks], dim=1), ckpt["row.weight"])
    expected = F.linear(ckpt["row_x"], ckpt["row.weight"], ckpt["row.bias"])
    for r in ranks:
        torch.testing.assert_close(r["row"][1], expected)


def test_vocab_parallel_embedding_pads_and_all_reduces(sharded) -> None:
    ckpt, ranks = sharded
    weights = torch.cat([r["embedding"][0] for r in ranks])
    assert weights.shape == (12, HIDDEN)
    assert torch.equal(weights[:VOCAB], ckpt["embedding"]) and not weights[VOCAB:].any()
    expected = F.embedding(ckpt["input_ids"], ckpt["embedding"])
    for r in ranks:
        assert torch.equal(r["embedding"][1], expected)


def test_lm_head_gathers_full_rows_on_every_rank(sharded) -> None:
    ckpt, ranks = sharded
    weights = torch.cat([r["lm_head"][0] for r in ranks])
    assert torch.equal(weights[:VOCAB], ckpt["embedding"]) and not weights[VOCAB:].any()
    expected = F.linear(ckpt["x"], ckpt["embedding"])
    for r in ranks:
        _, own, tied = r["lm_head"]
        assert own.shape == (5, VOCAB)
        torch.testing.assert_close(own, expected)
        torch.testing.assert_close(tied, expected)
    # Bitwise the same on every rank, so that every rank samples the same tokens.
    assert torch.equal(ranks[0]["lm_head"][1], ranks[1]["lm_head"][1])


def test_single_rank_layers_load_whole_tensors() -> None:
    ckpt = _checkpoint()
    row = RowParallelLinear(24, HIDDEN, bias=True)
    _load(row, "weight", ckpt["row.weight"])
    _load(row, "bias", ckpt["row.bias"])
    assert torch.equal(row.weight, ckpt["row.weight"])
    torch.testing.assert_close(
        row(ckpt["row_x"]), F.linear(ckpt["row_x"], ckpt["row.weight"], ckpt["row.bias"])
    )
    embedding = VocabParallelEmbedding(VOCAB, HIDDEN)
    _load(embedding, "weight", ckpt["embedding"])
    assert embedding.weight.shape == (VOCAB, HIDDEN)
    assert ParallelLMHead(VOCAB, HIDDEN, tied_to=embedding)(ckpt["x"]).shape == (5, VOCAB)
