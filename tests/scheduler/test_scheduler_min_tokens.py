"""min_tokens: the first min_tokens tokens cannot stop a sequence, whatever they are (the
worker masks stop tokens while sampling them; the scheduler holds to it for any worker)."""

from tests.support.fake_worker import EOS_TOKEN_IDS, LENGTH, STOP
from tests.support.scheduler_harness import Harness, sampling


def _always_eos(token_ids, index: int = 0) -> int:
    return EOS_TOKEN_IDS[0]


def test_stop_tokens_count_only_after_min_tokens() -> None:
    h = Harness(num_blocks=32, block_size=4, sampler=_always_eos)
    params = sampling(max_tokens=8, stop_token_ids=[EOS_TOKEN_IDS[0]])
    params.min_tokens = 3
    h.add("a", [5, 6, 7], params)
    h.add("b", [5, 6, 7], sampling(max_tokens=8))
    h.drain()
    assert len(h.tokens["a", 0]) == 4 and h.finals["a", 0].finish_reason == STOP
    assert len(h.tokens["b", 0]) == 1 and h.finals["b", 0].finish_reason == STOP


def test_min_tokens_equal_to_max_tokens_ends_by_length() -> None:
    h = Harness(num_blocks=32, block_size=4, sampler=_always_eos)
    params = sampling(max_tokens=3)
    params.min_tokens = 3
    h.add("a", [5, 6, 7], params)
    h.drain()
    assert len(h.tokens["a", 0]) == 3 and h.finals["a", 0].finish_reason == LENGTH
