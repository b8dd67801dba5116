"""Identity of a full KV block for the prefix cache.

A block's hash is chained over the previous block's hash and the block's own token ids, so
two blocks have the same hash only when the whole prefix up to their end is the same: the
KV of a token depends on every token before it, not only on the tokens of its block.
"""

from array import array
from collections.abc import Sequence

import xxhash

BlockHash = int


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """128 bits: a collision would silently serve another prompt's KV."""
    # The first block hashes its tokens alone; later ones are 16 bytes longer, so a first
    # block can never take the hash of a later one.
    prefix = b"" if parent is None else parent.to_bytes(16, "little")
    return xxhash.xxh3_128_intdigest(prefix + array("i", token_ids).tobytes())


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, num_blocks: int
) -> list[BlockHash]:
    """Grows `hashes` (the chained hashes of the leading full blocks of `token_ids`) to
    cover `num_blocks` blocks, and returns it."""
    assert num_blocks * block_size <= len(token_ids), "only full blocks have a hash"
    for block_index in range(len(hashes), num_blocks):
        start = block_index * block_size
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[start : start + block_size]))
    return hashes


def chained_hashes(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """The hashes of every full block of `token_ids`."""
    return extend_block_hashes([], token_ids, block_size, len(token_ids) // block_size)


def routing_key(block_hash: BlockHash) -> int:
    """The low 64 bits of a block's hash: what an engine publishes of its prefix cache for
    frontends to route by. A collision only misroutes a request, never serves wrong KV."""
    return block_hash & 0xFFFF_FFFF_FFFF_FFFF
