"""n completions of one prompt: the prompt is computed once, its first sample draws n
tokens, the completions share the prompt's blocks and copy the last, partial one before
writing into it."""

from tests.support.fake_worker import reference_output
from tests.support.scheduler_harness import ABORT, Harness, sampling

PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # two full blocks of 4 and a partial one


def test_the_prompt_is_computed_once_and_its_blocks_held_once() -> None:
    params = sampling(max_tokens=4, ignore_eos=True, n=3)
    h = Harness(num_blocks=32, block_size=4)
    h.add("a", PROMPT, params)
    outputs = h.step()
    assert outputs is not None and sorted(o.index for o in outputs) == [0, 1, 2]
    assert len(h.steps[0].new_sequences) == 1 and h.steps[0].new_sequences[0].sampling.n == 3
    manager = h.scheduler.block_manager
    prompt_blocks = list(h.steps[0].scheduled[0].new_block_ids)
    assert len(h.scheduler.running) == 3
    assert [manager.ref_count(b) for b in prompt_blocks] == [3, 3, 3]
    assert manager.num_total_blocks - manager.num_free_blocks == 3

    h.step()
    second = h.steps[1]
    assert sorted(n.index for n in second.new_sequences) == [0, 1, 2]
    assert all(not n.sampling.HasField("n") for n in second.new_sequences)
    # Two of the three copy the shared partial block; the last writer keeps it.
    assert len(second.copy_blocks) == 2 and {c.src_block_id for c in second.copy_blocks} == {prompt_blocks[2]}
    assert [manager.ref_count(b) for b in prompt_blocks[:2]] == [3, 3]
    assert manager.num_total_blocks - manager.num_free_blocks == 2 + 3

    h.drain()
    for index in range(3):
        assert h.tokens["a", index] == reference_output(PROMPT, params, 1024, index=index)[0]
    assert len({tuple(h.tokens["a", i]) for i in range(3)}) == 3
    assert h.scheduler.stats().num_generation_tokens == 12


def test_a_prompt_of_whole_blocks_needs_no_copy() -> None:
    h = Harness(num_blocks=32, block_size=4)
    h.add("a", PROMPT[:8], sampling(max_tokens=3, ignore_eos=True, n=4))
    h.drain()
    assert not any(step.copy_blocks for step in h.steps)


def test_completions_finish_on_their_own_and_the_request_with_the_last() -> None:
    # max_tokens 1: every completion ends at its first token with its own final output;
    # only the last one ends the request's stream.
    h = Harness(num_blocks=32, block_size=4)
    h.add("a", PROMPT, sampling(max_tokens=1, n=3))
    outputs = h.step()
    assert outputs is not None and all(o.finished for o in outputs)
    assert [o.request_finished for o in outputs] == [False, False, True]
    assert not h.scheduler.has_unfinished_requests()
    h.drain()


def test_abort_before_the_fork_ends_every_completion() -> None:
    h = Harness(num_blocks=32, block_size=4, max_num_batched_tokens=4)
    h.add("a", PROMPT, sampling(max_tokens=3, n=3))
    h.step()  # a prompt chunk: no token yet
    outputs = h.abort("a")
    assert outputs is not None and [(o.index, o.finish_reason) for o in outputs] == [
        (0, ABORT),
        (1, ABORT),
        (2, ABORT),
    ]
    assert [o.request_finished for o in outputs] == [False, False, True]
    h.drain()


def test_n_completions_take_n_seats() -> None:
    h = Harness(num_blocks=32, block_size=4, max_num_seqs=3)
    h.add("solo", [2, 3], sampling(max_tokens=3, ignore_eos=True))
    h.add("trio", PROMPT, sampling(max_tokens=3, ignore_eos=True, n=3))
    h.step()
    # 1 + 3 seats would exceed 3: the trio waits for the solo to finish.
    assert [n.token_ids[0] for n in h.steps[0].new_sequences] == [2]
    h.drain()
    assert all(len(h.tokens["trio", i]) == 3 for i in range(3))


def test_a_forked_completion_survives_preemption_in_both_modes() -> None:
    params = sampling(max_tokens=6, ignore_eos=True, n=3)
    for mode in ("recompute", "swap"):
        h = Harness(num_blocks=8, block_size=4, num_cpu_blocks=8, preemption_mode=mode)
        h.add("a", PROMPT, params)
        h.step()
        h.step()
        h.preempt(1, h.config.preemption_mode)
        h.drain()
        for index in range(3):
            assert h.tokens["a", index] == reference_output(PROMPT, params, 32, index=index)[0]
