"""Logprobs that the worker sends with its tokens reach the outputs of the requests that
asked for them, aligned with their tokens, through forks of n completions and through
outputs merged as the engine's coalescer merges them."""

from pagedserve.v1 import common_pb2, worker_pb2

from tests.support.scheduler_harness import FakeWorker, Harness, sampling

PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


class LogprobsWorker(FakeWorker):
    """Sends a logprob with every token that tells the token: -token_id."""

    def step(self, step: worker_pb2.StepRequest) -> worker_pb2.StepResult:
        result = super().step(step)
        result.logprobs.extend(common_pb2.TokenLogprobs(logprob=-float(t)) for t in result.token_ids)
        return result


def _harness() -> Harness:
    h = Harness(num_blocks=32, block_size=4)
    h.worker = LogprobsWorker(32, 4)
    return h


def test_logprobs_follow_their_tokens_to_the_requests_that_asked() -> None:
    h = _harness()
    asking = sampling(max_tokens=5, ignore_eos=True, n=2)
    asking.logprobs = 2
    h.add("asks", PROMPT, asking)
    h.add("plain", PROMPT[:6], sampling(max_tokens=5, ignore_eos=True))
    outputs = []
    while h.scheduler.has_unfinished_requests():
        outputs.extend(h.step() or [])
    for index in (0, 1):
        mine = [o for o in outputs if o.request_id == "asks" and o.index == index]
        tokens = [t for o in mine for t in o.new_token_ids]
        assert [-lp.logprob for o in mine for lp in o.logprobs] == tokens
        assert len(tokens) == 5
    assert all(not o.logprobs for o in outputs if o.request_id == "plain")


def test_merged_outputs_keep_their_logprobs_in_order() -> None:
    h = _harness()
    asking = sampling(max_tokens=6, ignore_eos=True)
    asking.logprobs = 0
    h.add("a", PROMPT, asking)
    outputs = []
    while h.scheduler.has_unfinished_requests():
        outputs.extend(h.step() or [])
    merged = outputs[0]
    for later in outputs[1:]:
        merged = later.absorb_earlier(merged)
    assert [-lp.logprob for lp in merged.logprobs] == merged.new_token_ids
    assert list(merged.to_proto().logprobs) == merged.logprobs
