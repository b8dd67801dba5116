"""Plain PyTorch reference of the paged KV cache store and of paged attention.

These functions define what the fused kernels must compute; they favour clarity over
speed and are the CPU path.

KV cache layout, per layer:

    keys                [num_blocks, block_size, num_kv_heads, head_dim]
    values              the same, except
    values of fp8 cache [num_blocks, num_kv_heads, head_dim, block_size]

Token slot s lives at block s // block_size, offset s % block_size. One token's heads are
contiguous, which suits the per-token store and the first dot product (query by keys),
whose operand wants each key's dims side by side. The second (probabilities by values)
wants each dim's values for neighbouring keys side by side: a 16-bit tile gets there
through the transposing form of ldmatrix, an 8-bit one has none, and was gathered byte by
byte (half the bytes of bf16 in 91% of its time on the H200). So an fp8 cache stores its
values [head, dim, slot] within each block; other caches do not: bf16 attention took
4-8% longer so on the H100. values_by_slot gives either as the keys are laid out.

A batch is flattened: the query tokens of all sequences are concatenated, and
`query_start_loc` (length num_seqs + 1, starting at 0) marks where each sequence's tokens
begin. A sequence with `seq_len` tokens in its context and `q_len` query tokens computes
positions [seq_len - q_len, seq_len): prefill, a chunk of prefill over a cached prefix and
decode (q_len == 1) are the same case.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Slot value marking a padding token whose key and value must not be stored.
PADDING_SLOT = -1


class KVScales(NamedTuple):
    """What a layer's keys and values are divided by as they are stored, and multiplied by
    as attention reads them: an fp8 cache's calibrated scales (a checkpoint's k_scale and
    v_scale), which keep large keys and values within e4m3's range; 1 otherwise."""

    key: float = 1.0
    value: float = 1.0


UNSCALED = KVScales()


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes each token's key and value into its cache slot.

    key, value: [num_tokens, num_kv_heads, head_dim].
    key_cache, value_cache: in the module's layout, contiguous.
    slot_mapping: [num_tokens] integer slots; PADDING_SLOT entries are skipped.
    """
    check_cache_layout(key_cache, value_cache)
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    flat_key_cache = key_cache.view(-1, num_kv_heads, head_dim)
    slots = slot_mapping.long()
    valid = slots != PADDING_SLOT
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    as_bytes(flat_key_cache).index_copy_(0, slots, as_bytes(key.to(key_cache.dtype)))
    # Attention reads an fp8 cache's values a whole block at a time and gives the slots
    # past a sequence's end no weight, which a non-finite value there would turn into NaN:
    # none is stored (in any cache, as the kernel does).
    value = torch.where(value.isfinite(), value, 0.0).to(value_cache.dtype)
    value_slots = as_bytes(values_by_slot(value_cache))
    value_slots[slots // block_size, slots % block_size] = as_bytes(value)


def values_by_dim(dtype: torch.dtype) -> bool:
    """Whether a value cache of this dtype holds its blocks [head, dim, slot] (fp8)."""
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def value_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[int, ...]:
    if values_by_dim(dtype):
        return (num_blocks, num_kv_heads, head_dim, block_size)
    return (num_blocks, block_size, num_kv_heads, head_dim)


def check_cache_layout(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Offsets are computed from the layout: both caches contiguous, in the module's shapes."""
    assert key_cache.is_contiguous() and value_cache.is_contiguous(), "caches must be contiguous"
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    expected = value_cache_shape(num_blocks, block_size, num_kv_heads, head_dim, value_cache.dtype)
    assert value_cache.shape == expected, f"values of {value_cache.dtype} must be {expected}"


def values_by_slot(value_cache: torch.Tensor) -> torch.Tensor:
    """The value cache as [num_blocks, block_size, num_kv_heads, head_dim] (a view)."""
    return value_cache.permute(0, 3, 1, 2) if values_by_dim(value_cache.dtype) else value_cache


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as its bytes, for the index copies torch does not implement for
    float8 (an fp8 KV cache); any other tensor as it is."""
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor.view(torch.uint8)
    return tensor


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of a flattened mixed batch over its paged KV cache.

    query: [num_tokens, num_heads, head_dim]; num_heads is a multiple of num_kv_heads
        (grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads)).
    key_cache, value_cache: in the module's layout; the keys and values of the query tokens
        themselves must already be stored.
    block_tables: [num_seqs, max_blocks_per_seq] block ids; entries past a sequence's
        last block are padding and never read.
    query_start_loc: [num_seqs + 1] offsets of each sequence's query tokens in `query`.
    seq_lens: [num_seqs] context length of each sequence, its query tokens included. A
        sequence's queries are its last positions; where it has more queries than context
        (the padding rows of a verification graph's layout), the first ones sit at negative
        positions, see no key and get zeros.
    sliding_window: a query at position p sees keys at positions (p - sliding_window, p];
        None: all of [0, p].
    logit_softcap: scores (after scaling) become cap * tanh(score / cap) before softmax.
    Returns [num_tokens, num_heads, head_dim] in the query's dtype; the arithmetic is fp32.
    """
    check_cache_layout(key_cache, value_cache)
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    group_size = num_heads // num_kv_heads
    output = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    for seq_index, seq_len in enumerate(lengths):
        q_start, q_end = starts[seq_index], starts[seq_index + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[seq_index, :num_blocks].long()
        keys = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        values = values_by_slot(value_cache[blocks]).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        keys = keys.float().repeat_interleave(group_size, dim=1)
        values = values.float().repeat_interleave(group_size, dim=1)

        q = query[q_start:q_end].float()
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        if logit_softcap is not None:
            scores = torch.tanh(scores / logit_softcap) * logit_softcap
        query_positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
        key_positions = torch.arange(seq_len, device=query.device)
        hidden = key_positions[None, :] > query_positions[:, None]
        if sliding_window is not None:
            hidden |= key_positions[None, :] <= query_positions[:, None] - sliding_window
        scores.masked_fill_(hidden, float("-inf"))
        # A row that sees no key (a negative position) gets zeros, not NaN.
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        output[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
    return output
