"""A full batch lets waiting requests in several at once (services/scheduler/
admission_pacing.py), within a bounded delay, and never holds one back while seats are
to spare."""

from tests.support.fake_worker import reference_output
from tests.support.scheduler_harness import Harness, sampling

# Four seats. The first four requests finish after 3, 5, 7 and 40 tokens; three more wait.
RUNNING = {"a": 3, "b": 5, "c": 7, "d": 40}
WAITING = ("e", "f", "g")


def _prompt(request_id: str) -> list[int]:
    return [10 + ord(request_id) - ord("a")] * 4


def _full_batch(**pacing: int) -> Harness:
    h = Harness(num_blocks=128, block_size=4, max_num_seqs=4, overlap=False, **pacing)
    for request_id, max_tokens in RUNNING.items():
        h.add(request_id, _prompt(request_id), sampling(max_tokens=max_tokens, ignore_eos=True))
    for request_id in WAITING:
        h.add(request_id, _prompt(request_id), sampling(max_tokens=6, ignore_eos=True))
    h.drain()
    return h


def _joined_at(h: Harness) -> dict[str, int]:
    """The index of the step each request's sequence first entered."""
    joined = {}
    for index, step in enumerate(h.steps):
        for new in step.new_sequences:
            request_id = chr(ord("a") + new.token_ids[0] - 10)
            joined.setdefault(request_id, index)
    return joined


def _check_outputs(h: Harness) -> None:
    for request_id in (*RUNNING, *WAITING):
        params = sampling(max_tokens=RUNNING.get(request_id, 6), ignore_eos=True)
        assert h.tokens[request_id, 0] == reference_output(_prompt(request_id), params, 128)[0]


def test_waiting_requests_join_together_once_the_free_seats_bring_enough_tokens() -> None:
    at_once = _joined_at(_full_batch(admission_batch_tokens=0))
    # Without pacing each joins in the step after a seat frees: three different steps.
    assert len({at_once[r] for r in WAITING}) == 3
    # Two free seats bring 8 prompt tokens: e and f wait for b's seat and join together.
    paced_run = _full_batch(admission_batch_tokens=8, admission_max_delay_steps=100)
    paced = _joined_at(paced_run)
    assert paced["e"] == paced["f"] > at_once["e"]
    _check_outputs(paced_run)


def test_no_request_is_held_back_longer_than_the_delay() -> None:
    at_once = _joined_at(_full_batch(admission_batch_tokens=0))
    run = _full_batch(admission_batch_tokens=1000, admission_max_delay_steps=2)
    paced = _joined_at(run)
    assert at_once["e"] < paced["e"] <= at_once["e"] + 2
    _check_outputs(run)


def test_a_newcomer_joins_at_once_while_seats_are_to_spare() -> None:
    h = Harness(num_blocks=128, block_size=4, max_num_seqs=8, overlap=False, admission_batch_tokens=1000)
    for request_id, max_tokens in RUNNING.items():
        h.add(request_id, _prompt(request_id), sampling(max_tokens=max_tokens, ignore_eos=True))
    h.step()
    h.step()  # decoding now
    h.add("e", _prompt("e"), sampling(max_tokens=6, ignore_eos=True))
    h.step()
    assert [new.token_ids[0] for new in h.steps[-1].new_sequences] == [_prompt("e")[0]]
