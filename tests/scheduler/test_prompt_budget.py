"""A step that decodes carries at most --max-prompt-tokens-with-decodes prompt tokens while
the queued prompts fit one step (services/scheduler/prompt_budget.py); an idle batch and
a deep queue get the full step."""

from tests.support.fake_worker import reference_output
from tests.support.scheduler_harness import Harness, sampling

CAP = 16
BUDGET = 256


def _harness(cap: int | None = CAP, per_decode: int = 0) -> Harness:
    return Harness(
        num_blocks=512,
        block_size=4,
        max_model_len=1024,
        max_num_batched_tokens=BUDGET,
        overlap=False,
        max_prompt_tokens_with_decodes=cap,
        prompt_tokens_per_decode=per_decode,
    )


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7 + i) % 30 + 2 for i in range(length)]


def _step_tokens(h: Harness) -> tuple[int, int]:
    """Runs one step: (its decode tokens, its prompt tokens)."""
    scheduled = h.schedule()
    assert scheduled is not None
    new_tokens = [item.num_new_tokens for item in scheduled.scheduled]
    h.finish_step(scheduled)
    return sum(n for n in new_tokens if n == 1), sum(n for n in new_tokens if n > 1)


def _start_decoding(h: Harness, num: int) -> None:
    for index in range(num):
        h.add(f"d{index}", _prompt(index, 8), sampling(max_tokens=60, ignore_eos=True))
    h.step()
    assert _step_tokens(h)[0] == num  # decoding now


def test_a_long_prompt_beside_decodes_is_spread_over_capped_steps() -> None:
    h = _harness()
    _start_decoding(h, 3)
    long_prompt = _prompt(9, 100)
    params = sampling(max_tokens=5, ignore_eos=True)
    h.add("long", long_prompt, params)
    steps = [_step_tokens(h) for _ in range(7)]
    # 100 prompt tokens in chunks of at most 16, while all 3 decodes go on every step.
    assert [prompt for _, prompt in steps] == [16] * 6 + [4]
    assert all(decodes == 3 for decodes, _ in steps)
    h.drain()
    assert h.tokens["long", 0] == reference_output(long_prompt, params, 1024)[0]
    for index in range(3):
        expected = reference_output(_prompt(index, 8), sampling(max_tokens=60, ignore_eos=True), 1024)
        assert h.tokens[f"d{index}", 0] == expected[0]


def test_the_cap_grows_with_the_sequences_that_decode() -> None:
    h = _harness(per_decode=4)
    _start_decoding(h, 3)
    long_prompt = _prompt(9, 100)
    h.add("long", long_prompt, sampling(max_tokens=5, ignore_eos=True))
    # 16 + 4 for each of the 3 decodes: 28 a step.
    steps = [_step_tokens(h) for _ in range(4)]
    assert steps == [(3, 28), (3, 28), (3, 28), (3, 16)]
    h.drain()
    assert (
        h.tokens["long", 0] == reference_output(long_prompt, sampling(max_tokens=5, ignore_eos=True), 1024)[0]
    )


def test_chunks_and_newcomers_share_the_cap() -> None:
    h = _harness()
    _start_decoding(h, 2)
    h.add("a", _prompt(20, 24), sampling(max_tokens=3, ignore_eos=True))
    h.add("b", _prompt(21, 24), sampling(max_tokens=3, ignore_eos=True))
    prompt_tokens = [_step_tokens(h)[1] for _ in range(3)]
    # a's first 16; a's last 8 with b's first 8; b's last 16.
    assert prompt_tokens == [16, 16, 16]
    h.drain()


def test_an_idle_batch_takes_the_whole_prompt_at_once() -> None:
    h = _harness()
    h.add("long", _prompt(3, 100), sampling(max_tokens=3, ignore_eos=True))
    assert _step_tokens(h) == (0, 100)
    h.drain()


def test_a_queue_deeper_than_a_step_is_computed_at_full_steps() -> None:
    h = _harness()
    _start_decoding(h, 2)
    for index in range(6):  # 600 prompt tokens queued: more than a 256-token step
        h.add(f"q{index}", _prompt(30 + index, 100), sampling(max_tokens=3, ignore_eos=True))
    decodes, prompt_tokens = _step_tokens(h)
    assert decodes == 2 and prompt_tokens == BUDGET - 2
    h.drain()


def test_without_the_cap_a_prompt_fills_the_step_beside_decodes() -> None:
    h = _harness(cap=None)
    _start_decoding(h, 3)
    h.add("long", _prompt(9, 100), sampling(max_tokens=5, ignore_eos=True))
    assert _step_tokens(h) == (3, 100)
    h.drain()
