"""The scheduler's flags, shared by `pagedserve scheduler` and `pagedserve serve`."""

import argparse

from services.flag_table import Flag, add_flags
from services.scheduler.coalescing import KEEPING_UP_FACTOR, SAVED_STEPS
from services.scheduler.config import SchedulerConfig


def add_scheduler_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preemption-mode",
        choices=["recompute", "swap"],
        default=SchedulerConfig.preemption_mode.value,
        help="what a preempted request's KV becomes: dropped and recomputed, or swapped "
        "to the worker's CPU pool (--swap-space)",
    )
    parser.add_argument(
        "--max-waiting-requests",
        type=int,
        default=SchedulerConfig.max_waiting_requests,
        help="requests that may wait for seats or KV blocks; past it new ones get "
        "RESOURCE_EXHAUSTED; default: no limit",
    )
    parser.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing cached KV blocks",
    )
    parser.add_argument(
        "--no-overlap-scheduling",
        dest="overlap_scheduling",
        action="store_false",
        help="plan each step only once the previous one's result is back, not while the worker runs it",
    )
    add_flags(
        parser,
        Flag(
            "--max-steps-in-flight",
            int,
            SchedulerConfig.max_steps_in_flight,
            "with overlapped scheduling, steps sent to the worker before the oldest one's result "
            "is back; default: as many as the worker runs at once",
        ),
        Flag(
            "--max-stream-messages-per-step",
            int,
            SchedulerConfig.max_stream_messages_per_step,
            "token messages streamed per step to each tokenizer process: beyond it, completions' "
            "tokens wait merged for their turn (first tokens and last messages never wait); a "
            f"step's unused messages are saved for later steps, up to {SAVED_STEPS} steps' worth; "
            f"a tokenizer that says it keeps up gets every token at once up to {KEEPING_UP_FACTOR}x "
            "the limit; 0: no limit",
        ),
        Flag(
            "--speculative-max-batch-size",
            int,
            SchedulerConfig.speculative_max_batch_size,
            "with a speculating worker: no speculation in steps planned while more sequences "
            "run or wait to run; 0: never speculate",
        ),
        Flag(
            "--speculative-min-accepted-tokens",
            float,
            SchedulerConfig.speculative_min_accepted_tokens,
            "a sequence whose speculating steps accept fewer proposals on average decodes "
            "plainly for --speculative-backoff-steps steps",
        ),
        Flag(
            "--speculative-backoff-steps",
            int,
            SchedulerConfig.speculative_backoff_steps,
            "plain steps of a sequence whose speculation stopped paying, before it tries again",
        ),
    )
    _add_admission_args(parser)


def _add_admission_args(parser: argparse.ArgumentParser) -> None:
    """How the scheduler lets waiting prompts into steps that decode."""
    add_flags(
        parser,
        Flag(
            "--admission-batch-tokens",
            int,
            SchedulerConfig.admission_batch_tokens,
            "while more requests wait than the free seats take, a step that would only decode "
            "lets them in once the free seats would bring this many tokens to compute; 0: at once",
        ),
        Flag(
            "--admission-max-delay-steps",
            int,
            SchedulerConfig.admission_max_delay_steps,
            "most steps that --admission-batch-tokens holds waiting requests back",
        ),
        Flag(
            "--max-prompt-tokens-with-decodes",
            int,
            SchedulerConfig.max_prompt_tokens_with_decodes,
            "prompt tokens a step computes beside decoding sequences while the queued prompts fit "
            "one step, so that a long prompt does not stall every stream; 0: no cap",
        ),
        Flag(
            "--prompt-tokens-per-decode",
            int,
            SchedulerConfig.prompt_tokens_per_decode,
            "with --max-prompt-tokens-with-decodes: prompt tokens the cap grows by per decoding sequence",
        ),
    )


def add_step_limit_args(parser: argparse.ArgumentParser) -> None:
    """The scheduler's own caps on a step's size, which may not exceed its worker's."""
    add_flags(
        parser,
        Flag(
            "--max-num-seqs",
            int,
            SchedulerConfig.max_num_seqs,
            "most sequences in one step; default: the worker's, and more is refused",
        ),
        Flag(
            "--max-num-batched-tokens",
            int,
            SchedulerConfig.max_num_batched_tokens,
            "most tokens in one step; default: the worker's, and more is refused",
        ),
    )


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    """The scheduler configuration that `pagedserve scheduler` options `args` ask for."""
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        preemption_mode=args.preemption_mode,
        max_waiting_requests=args.max_waiting_requests,
        max_steps_in_flight=args.max_steps_in_flight if args.overlap_scheduling else 1,
        max_stream_messages_per_step=args.max_stream_messages_per_step or None,
        speculative_max_batch_size=args.speculative_max_batch_size,
        speculative_min_accepted_tokens=args.speculative_min_accepted_tokens,
        speculative_backoff_steps=args.speculative_backoff_steps,
        admission_batch_tokens=args.admission_batch_tokens,
        admission_max_delay_steps=args.admission_max_delay_steps,
        max_prompt_tokens_with_decodes=args.max_prompt_tokens_with_decodes or None,
        prompt_tokens_per_decode=args.prompt_tokens_per_decode,
    )


def add_kv_blocks_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        default=SchedulerConfig.num_kv_blocks,
        help="cap on the KV pool in blocks (for tests and small machines)",
    )
