"""What a captured forward may keep from outside its capture (gpu_worker/cuda_graphs.py).

Layers derive values from a step's attention metadata once per forward (the prefill
kernel's tile map, AttentionMetadata.derived). A graph replays only what was captured: a
value derived by the warm-up run before capture would be read by every replay as it was
at capture time, from memory freed once capture is done. CUDA graphs cannot be captured
on this machine, so here torch.cuda's graph API is replaced by stand-ins that mark when
capture is on, and the check is where each derived value was made; on CUDA, the engine
test below replays real graphs against eager steps."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import pytest
import torch
from pagedserve.v1 import common_pb2
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from gpu_worker.cuda_graphs import capture_forward
from gpu_worker.model.attention import AttentionMetadata, get_attention_metadata
from tests.support.engine_loop import run_engine
from tests.support.tiny_llama import EOS_TOKEN_ID, TINY_DIMS, VOCAB_SIZE


class _CaptureStandIn:
    """torch.cuda.graph's place: capture is on between enter and exit."""

    active = False

    def __init__(self, graph: object, pool: object = None) -> None:
        pass

    def __enter__(self) -> None:
        _CaptureStandIn.active = True

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        _CaptureStandIn.active = False


class _DerivingModel(nn.Module):
    """Derives one value per forward, as the attention layers do, noting whether it was
    made during capture."""

    def __init__(self) -> None:
        super().__init__()
        self.made_during_capture: list[bool] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: None) -> torch.Tensor:
        def make() -> torch.Tensor:
            self.made_during_capture.append(_CaptureStandIn.active)
            return input_ids.cumsum(0)

        tiles = get_attention_metadata().derived("tiles", make)
        return tiles + positions


def test_the_captured_forward_derives_its_own_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "graph", _CaptureStandIn)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(4, dtype=torch.int64),
        query_start_loc=torch.tensor([0, 4], dtype=torch.int32),
        seq_lens=torch.tensor([4], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        max_query_len=4,
        max_seq_len=4,
    )
    model = _DerivingModel()
    capture_forward(model, torch.arange(4), torch.arange(4), None, metadata, pool=None)
    # The warm-up made its value outside capture; the captured forward made its own.
    assert model.made_during_capture == [False, True]
    # Nothing either run derived stays with the caller's metadata for a later forward.
    assert metadata._derived == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_steps_replayed_from_graphs_give_the_eager_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_DIMS)).eval().save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(3)
    requests = []
    for i in range(12):
        length = int(torch.randint(2, 40, (1,), generator=generator))
        prompt = torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist()
        sampling = common_pb2.SamplingParams(max_tokens=12, temperature=0.0)
        requests.append((f"r{i}", prompt, sampling))
    # Steps of at most 24 tokens mix new prompts with decodes: most replay the smallest
    # prefill graph; the rest replay decode graphs. Float32, so that no rounding decides.
    runs = [
        run_engine(
            tmp_path, requests, EOS_TOKEN_ID, 2, num_kv_blocks=256, device="cuda", dtype="float32", **eager
        )
        for eager in ({"enforce_eager": True}, {"enforce_eager": False})
    ]
    assert all(run.all_blocks_freed for run in runs)
    assert runs[1].tokens == runs[0].tokens
