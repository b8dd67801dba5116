"""Dimensions of the tiny random Llama-family checkpoints that the worker tests build with
HF transformers: small enough for a CPU, with grouped-query attention."""

VOCAB_SIZE = 256
EOS_TOKEN_ID = 2

_WIDTHS = dict(hidden_size=64, intermediate_size=128)

# Two layers, 4 query heads sharing 2 KV heads.
TINY_DIMS = dict(
    **_WIDTHS,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=256,
    # Wider than the default init so that logits are peaked and greedy choices are not
    # decided by rounding.
    initializer_range=0.1,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=0,
)

# For splitting over ranks: 8 query heads and 4 KV heads for up to 4 tensor-parallel
# ranks, 4 layers for up to 4 pipeline stages, a vocabulary that 2 ranks split unevenly.
PARALLEL_DIMS = dict(
    **_WIDTHS,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=251,
)
