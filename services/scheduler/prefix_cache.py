"""How the scheduler uses the block pool's prefix cache: what a sequence may reuse when it
starts, and which of its blocks to offer once their KV is computed."""

from services.scheduler.block_manager import BlockManager
from services.scheduler.request import Sequence


class PrefixCache:
    def __init__(self, block_manager: BlockManager, enabled: bool) -> None:
        self.block_manager = block_manager
        self.enabled = enabled
        # Prompt tokens looked up at first admission, and of those, found cached.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    def lookup(self, sequence: Sequence) -> list[int]:
        """The cached blocks of the sequence's longest cached prefix of full blocks."""
        if not self.enabled:
            return []
        block_size = self.block_manager.block_size
        # At least one token must still be computed, for the worker to have logits to
        # sample from.
        num_blocks = (sequence.num_tokens - 1) // block_size
        return self.block_manager.cached_prefix(sequence.hashes_of_full_blocks(num_blocks, block_size))

    def count_first_admission(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        if self.enabled:
            self.num_queried_tokens += num_prompt_tokens
            self.num_hit_tokens += num_cached_tokens

    def register_computed_blocks(self, sequence: Sequence) -> None:
        """Offers the sequence's newly computed full blocks: those of the steps sent so
        far, which the worker runs before any later step can read them. A block's hash
        needs its tokens, so a block holding a token still being sampled waits."""
        if not self.enabled:
            return
        block_size = self.block_manager.block_size
        num_full = min(sequence.num_computed_tokens, sequence.num_tokens) // block_size
        start = sequence.num_registered_blocks
        if num_full <= start:
            return
        hashes = sequence.hashes_of_full_blocks(num_full, block_size)
        self.block_manager.cache_full_blocks(sequence.block_table[start:num_full], hashes[start:])
        sequence.num_registered_blocks = num_full
