"""The benchmark's inputs: the nano-vllm workload, and model directories to run it on.

GPU runs use a real architecture's config with seeded random weights (speed does not
depend on weight values), saved as a Hugging Face directory that both pagedserve and HF
transformers load. Its tokenizer.json is a word-level vocabulary with one word per id, so
that the tokenizer service can turn any generated id into text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from gpu_worker.model.config import ModelConfig

# The GPU benchmarks' architecture (DESIGN.md, "How performance is measured").
QWEN3_CONFIG = Path(__file__).parent / "configs" / "qwen3-0.6b.json"


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lengths: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lengths)

    def subset(self, num_seqs: int) -> Workload:
        return Workload(self.prompts[:num_seqs], self.output_lengths[:num_seqs])


def nano_vllm_workload(
    num_seqs: int = 256, min_len: int = 100, max_len: int = 1024, max_token_id: int = 10000, seed: int = 0
) -> Workload:
    """Exactly nano-vllm's bench.py draw: all prompts first, then one output length each."""
    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, max_token_id) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_seqs)
    ]
    output_lengths = [rng.randint(min_len, max_len) for _ in range(num_seqs)]
    return Workload(prompts, output_lengths)


def write_random_model(
    config_path: Path, out_dir: Path, seed: int = 0, std: float = 0.02, with_weights: bool = True
) -> Path:
    """A model directory with `config_path`'s architecture and seeded random bf16 weights;
    without weights, for workers that make their own (`--load-format dummy`)."""
    raw = json.loads(Path(config_path).read_text())
    config = ModelConfig.from_dicts(raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    if not with_weights:
        _write_word_level_tokenizer(out_dir, config.vocab_size)
        return out_dir
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16)

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, dtype=torch.bfloat16)

    hidden, heads, kv_heads, head_dim = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    tensors = {
        "model.embed_tokens.weight": normal(config.vocab_size, hidden),
        "model.norm.weight": ones(hidden),
    }
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = normal(config.vocab_size, hidden)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "input_layernorm.weight": ones(hidden),
            prefix + "post_attention_layernorm.weight": ones(hidden),
            prefix + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": normal(config.intermediate_size, hidden),
            prefix + "mlp.up_proj.weight": normal(config.intermediate_size, hidden),
            prefix + "mlp.down_proj.weight": normal(hidden, config.intermediate_size),
        }
        if config.use_qk_norm:
            tensors[prefix + "self_attn.q_norm.weight"] = ones(head_dim)
            tensors[prefix + "self_attn.k_norm.weight"] = ones(head_dim)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_word_level_tokenizer(out_dir, config.vocab_size)
    return out_dir


def _write_word_level_tokenizer(out_dir: Path, vocab_size: int) -> None:
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))


def model_weight_bytes(model_dir: Path, dtype_bytes: float) -> int:
    """Bytes of every weight, each once (the embedding as the tied LM head; the lookup
    itself reads only a few rows): what a decode step of a large batch reads."""
    return round(step_weight_bytes(model_dir, dtype_bytes)(None))


def step_weight_bytes(model_dir: Path, dtype_bytes: float) -> Callable[[int | None], float]:
    """Bytes of weights a decode step of a given number of sequences reads (None: every
    weight). Dense models read all of them at any batch; a mixture of experts reads the
    experts its tokens are routed to, on average E (1 - (1 - k/E)^batch) of E experts
    with k per token (routing spread evenly, as random weights spread it)."""
    config = ModelConfig.from_model_dir(model_dir)
    hidden = config.hidden_size
    norms = 2 * hidden + (2 * config.head_dim if config.use_qk_norm else 0)
    outside_layers = config.vocab_size * hidden + hidden

    def bytes_read(batch: int | None) -> float:
        experts = float(config.num_experts)
        if batch is not None and config.num_experts:
            experts *= 1 - (1 - config.num_experts_per_tok / config.num_experts) ** batch
        layers = sum(_layer_params(config, i, experts) + norms for i in range(config.num_hidden_layers))
        return (layers + outside_layers) * dtype_bytes

    return bytes_read


def _layer_params(config: ModelConfig, layer_index: int, experts: float) -> float:
    """Weights of one layer's projections: q, k, v, o and its MLP's three, a dense MLP's
    or `experts` routed experts' with the router."""
    hidden = config.hidden_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = hidden * (q + 2 * kv) + q * hidden
    if config.is_moe_layer(layer_index):
        return attention + experts * 3 * hidden * config.moe_intermediate_size + hidden * config.num_experts
    return attention + 3 * hidden * config.intermediate_size


def prefill_flops(workload: Workload, model_dir: Path) -> float:
    """Floating-point operations of the workload's prompts: every layer's projections
    per prompt token, and causal attention's scores and weighted values (the LM head runs
    on each prompt's last token only, left out). A decode step's projections are left
    out of any bound here: below about 230 rows bf16 GEMMs on an H200 read their weights
    in more time than they multiply them, so roofline_seconds covers them."""
    config = ModelConfig.from_model_dir(model_dir)
    # A token passes through its k experts only.
    projection_params = sum(
        _layer_params(config, i, config.num_experts_per_tok) for i in range(config.num_hidden_layers)
    )
    # Per layer, QK^T and PV: 2 flops a multiply-add, 2 products, n(n+1)/2 visible pairs.
    attention_per_pair = config.num_hidden_layers * 2 * 2 * config.num_attention_heads * config.head_dim
    return sum(
        2 * projection_params * len(prompt) + attention_per_pair * len(prompt) * (len(prompt) + 1) / 2
        for prompt in workload.prompts
    )


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int) -> int:
    config = ModelConfig.from_model_dir(model_dir)
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


def roofline_seconds(
    workload: Workload, weight_bytes: Callable[[int | None], float], kv_token_bytes: int, bandwidth: float
) -> float:
    """Time to read what the workload's decode must read at `bandwidth` bytes/s, with every
    sequence in the batch from the start: each step reads the weights its batch needs
    (step_weight_bytes), and each running sequence's whole context (prompt + tokens so
    far) from the KV cache."""
    num_steps = max(workload.output_lengths)
    # Step s runs every sequence with more than s tokens to produce.
    remaining = sorted(workload.output_lengths)
    weight_reads, running = 0.0, len(remaining)
    for step in range(num_steps):
        while remaining[len(remaining) - running] <= step:
            running -= 1
        weight_reads += weight_bytes(running)
    kv_token_reads = 0
    for prompt, num_out in zip(workload.prompts, workload.output_lengths):
        # Token k (k >= 1) is sampled from a forward over a context of len(prompt) + k.
        kv_token_reads += sum(len(prompt) + k for k in range(1, num_out))
    return (weight_reads + kv_token_reads * kv_token_bytes) / bandwidth
