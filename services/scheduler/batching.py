"""How a scheduled sequence enters a step: what the worker is told about it (its whole
state when it is new to the worker, only the blocks it appended otherwise) and what the
scheduler counts as done once the step is sent."""

from services.scheduler.block_manager import SlotAllocation
from services.scheduler.outputs import NewSequenceData, ScheduledSequenceData, SchedulerOutput
from services.scheduler.request import Sequence


class StepBatcher:
    """Adds sequences to steps; gives each sequence its seq_id the first time it is sent."""

    def __init__(self) -> None:
        self._next_seq_id = 1

    def add(
        self,
        output: SchedulerOutput,
        sequence: Sequence,
        num_new_tokens: int,
        allocation: SlotAllocation,
        num_lookahead_tokens: int = 0,
    ) -> None:
        """num_lookahead_tokens: slots allocated past the new tokens for the worker's
        proposals; they are not counted as computed (the result says how many are)."""
        if sequence.seq_id is None:
            sequence.seq_id = self._next_seq_id
            self._next_seq_id += 1
            output.new_sequences.append(
                NewSequenceData(
                    seq_id=sequence.seq_id,
                    index=sequence.index,
                    token_ids=tuple(sequence.token_ids),
                    num_computed_tokens=sequence.num_computed_tokens,
                    sampling=sequence.worker_sampling,
                    # Resumed tokens were generated elsewhere: penalties count them.
                    num_prompt_tokens=sequence.num_prompt_tokens - sequence.request.num_resumed_tokens,
                )
            )
            # A sequence new to the worker brings its whole block table.
            new_block_ids = tuple(sequence.block_table)
        else:
            # The protocol only appends to a known table; block_manager's books say why a
            # known sequence never writes into a shared block: sharers are all introduced
            # anew (forks, cache hits, swap-ins) and copy before their first write.
            assert not allocation.copies, f"seq {sequence.seq_id} would write into a shared block"
            new_block_ids = allocation.new_block_ids
        if allocation.copies:
            output.copy_blocks.extend(allocation.copies)
        reaches_end = sequence.num_computed_tokens + num_new_tokens == sequence.num_planned_tokens
        num_samples = (sequence.request.n if sequence.awaits_fork else 1) if reaches_end else 0
        output.scheduled.append(
            ScheduledSequenceData(
                sequence=sequence,
                seq_id=sequence.seq_id,
                num_new_tokens=num_new_tokens,
                new_block_ids=new_block_ids,
                num_samples=num_samples,
                num_lookahead_tokens=num_lookahead_tokens,
            )
        )
        if num_lookahead_tokens:
            sequence.speculating = True
            output.num_speculating += 1
        # Counted as computed once sent: the worker runs steps in order, so every later
        # step finds this KV in place.
        sequence.num_computed_tokens += num_new_tokens
        sequence.last_step_id = output.step_id
        if num_samples:
            sequence.num_pending_samples += 1
