"""A fake worker that keeps per-sequence state from the step messages alone, as a real
worker does, and checks that the messages are consistent; a deterministic sampler stands in
for the model, and reference_output says what a completion yields run alone.

The fake worker's KV slots remember which position they hold and the whole context up to
it (a real token's KV depends on every token before it), so that a sequence reading a slot
through a wrong, shared, stale or evicted block fails loudly. Like the real worker it runs
steps in the order they are sent."""

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, worker_pb2

from services.scheduler.block_manager import cdiv

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH

VOCAB = 32
EOS_TOKEN_IDS = (0, 1)

# A sampler stands in for the model: the next token of (context, completion index).
Sampler = Callable[[Sequence[int], int], int]
# What a KV slot holds: its position and the tokens up to and including it.
Slot = tuple[int, tuple[int, ...]]


def hash_sampler(token_ids: Sequence[int], index: int = 0) -> int:
    """Deterministic; the next token depends on the whole context and the completion."""
    h = 17 + 7919 * index
    for t in token_ids:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


@dataclass
class WorkerSeq:
    token_ids: list[int]
    num_computed_tokens: int
    index: int
    num_samples: int
    block_table: list[int] = field(default_factory=list)


class FakeWorker:
    def __init__(
        self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0, sampler: Sampler = hash_sampler
    ) -> None:
        self.block_size = block_size
        self.sampler = sampler
        self.kv: list[list[Slot | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.cpu_kv: list[list[Slot | None]] = [[None] * block_size for _ in range(num_cpu_blocks)]
        self.seqs: dict[int, WorkerSeq] = {}
        self.seen_seq_ids: set[int] = set()
        self.next_step_id = 1
        self.unexecuted: deque[worker_pb2.StepRequest] = deque()
        self.results: dict[int, worker_pb2.StepResult] = {}

    def submit(self, step: worker_pb2.StepRequest) -> None:
        self.unexecuted.append(step)

    def run_submitted(self) -> None:
        while self.unexecuted:
            step = self.unexecuted.popleft()
            self.results[step.step_id] = self.step(step)

    def result(self, step_id: int) -> worker_pb2.StepResult:
        """The step's result, running it (and the steps sent before it) if not yet run."""
        while step_id not in self.results:
            step = self.unexecuted.popleft()
            self.results[step.step_id] = self.step(step)
        return self.results.pop(step_id)

    @property
    def caught_up(self) -> bool:
        """Every step sent has run."""
        return not self.unexecuted

    def slot(self, seq: WorkerSeq, pos: int) -> Slot | None:
        return self.kv[seq.block_table[pos // self.block_size]][pos % self.block_size]

    def check_context(self, seq_id: int, seq: WorkerSeq, end: int) -> None:
        for pos in range(end):
            expected = (pos, tuple(seq.token_ids[: pos + 1]))
            assert self.slot(seq, pos) == expected, f"seq {seq_id}: KV at {pos} is not its own"

    def step(self, step: worker_pb2.StepRequest) -> worker_pb2.StepResult:
        step = worker_pb2.StepRequest.FromString(step.SerializeToString())
        assert step.step_id == self.next_step_id
        self.next_step_id += 1
        for seq_id in step.finished_seq_ids:
            del self.seqs[seq_id]
        # Block operations, in the order the protocol gives them, before anything runs.
        for op in step.swap_out:
            self.cpu_kv[op.dst_block_id] = list(self.kv[op.src_block_id])
        for op in step.swap_in:
            self.kv[op.dst_block_id] = list(self.cpu_kv[op.src_block_id])
        for op in step.copy_blocks:
            self.kv[op.dst_block_id] = list(self.kv[op.src_block_id])
        for new in step.new_sequences:
            assert new.seq_id not in self.seen_seq_ids, "seq_id introduced twice"
            assert new.sampling.HasField("seed"), "the scheduler always sets a seed"
            self.seen_seq_ids.add(new.seq_id)
            num_samples = new.sampling.n if new.sampling.HasField("n") else 1
            self.seqs[new.seq_id] = WorkerSeq(
                list(new.token_ids), new.num_computed_tokens, new.index, num_samples
            )
        new_ids = {new.seq_id for new in step.new_sequences}
        scheduled_ids = [s.seq_id for s in step.scheduled]
        assert len(scheduled_ids) == len(set(scheduled_ids))
        assert new_ids <= set(scheduled_ids)
        for item in step.scheduled:
            self.seqs[item.seq_id].block_table.extend(item.new_block_ids)
        # KV said to be computed already (cache hits, swap-ins, forks) must be there.
        for seq_id in new_ids:
            seq = self.seqs[seq_id]
            self.check_context(seq_id, seq, seq.num_computed_tokens)

        result = worker_pb2.StepResult(step_id=step.step_id)
        writer_of_block: dict[int, int] = {}
        for item in step.scheduled:
            seq = self.seqs[item.seq_id]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            assert item.num_new_tokens >= 1 and end <= len(seq.token_ids)
            assert len(seq.block_table) == cdiv(end, self.block_size), "blocks do not match the tokens"
            for pos in range(start, end):
                block_id = seq.block_table[pos // self.block_size]
                assert writer_of_block.setdefault(block_id, item.seq_id) == item.seq_id, (
                    "two writers, one block"
                )
                self.kv[block_id][pos % self.block_size] = (pos, tuple(seq.token_ids[: pos + 1]))
            seq.num_computed_tokens = end
            if end == len(seq.token_ids):
                self.check_context(item.seq_id, seq, end)
                indices = range(seq.num_samples) if seq.num_samples > 1 else [seq.index]
                tokens = [self.sampler(seq.token_ids, index) for index in indices]
                seq.token_ids.append(tokens[0])
                seq.num_samples = 1
                result.seq_ids.extend([item.seq_id] * len(tokens))
                result.token_ids.extend(tokens)
        return result


def reference_output(
    prompt: Sequence[int],
    params: common_pb2.SamplingParams,
    max_model_len: int,
    sampler: Sampler = hash_sampler,
    index: int = 0,
) -> tuple[list[int], int]:
    """What a completion yields run alone, with no batching, chunking or preemption."""
    tokens, generated = list(prompt), []
    while True:
        token = sampler(tokens, index)
        tokens.append(token)
        generated.append(token)
        if token in params.stop_token_ids or (not params.ignore_eos and token in EOS_TOKEN_IDS):
            return generated, STOP
        if params.HasField("max_tokens") and len(generated) >= params.max_tokens:
            return generated, LENGTH
        if len(tokens) >= max_model_len:
            return generated, LENGTH
