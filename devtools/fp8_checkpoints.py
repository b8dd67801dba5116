"""Fine-grained fp8 checkpoints made from an unquantized one, for the tests: every
projection's weight in float8 e4m3 with one scale per block, stored as HF's fine-grained
fp8 format (the FP8 releases of Qwen3 and DeepSeek-V3) stores them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from devtools.int4_checkpoints import QUANTIZED_PROJECTIONS


def fine_grained_fp8_config(block: int) -> dict:
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block]}


def set_quantization_config(model_dir: Path, quantization_config: dict) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (model_dir / "config.json").write_text(json.dumps(config))


def write_fp8_block_checkpoint(model_dir: Path, block: int) -> dict[str, torch.Tensor]:
    """The projections (experts' included) as HF's fine-grained fp8 stores them: `weight`
    in float8 e4m3 and `weight_scale_inv`, one scale per block x block tile, the largest
    of each block at e4m3's largest. Returns the dequantized weights by tensor name."""
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    dequantized = {}
    for name in [n for n in tensors if n.rsplit(".", 2)[-2] in QUANTIZED_PROJECTIONS]:
        rows, columns = tensors[name].shape
        tiles = tensors[name].view(rows // block, block, columns // block, block)
        scale = tiles.abs().amax(dim=(1, 3)) / 448.0
        values = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        dequantized[name] = (values.float() * scale[:, None, :, None]).view(rows, columns)
        tensors[name] = values.view(rows, columns)
        tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(path), metadata={"format": "pt"})
    set_quantization_config(model_dir, fine_grained_fp8_config(block))
    return dequantized
