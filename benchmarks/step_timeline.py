"""Where a run's time goes, step by step, from a worker's step timeline
(gpu_worker/step_timeline.py): the device's time per step, the host's time launching it,
and the time the device waited before it, by kind and batch size.

    python -m benchmarks.throughput --device cuda --runs grpc,inprocess --step-timeline timelines/
    python -m benchmarks.step_timeline timelines/grpc-3.jsonl   # grpc-<steps in flight>.jsonl, inprocess.jsonl

`benchmarks.throughput --step-timeline DIR` writes one file per engine (warm-ups and
several runs in one file) and puts the summary of each run's own window into its JSON;
given a file, this prints the summary of every step in it, and for each run in it (steps
with no pause of a second between them: one rate of `benchmarks.serving --step-timeline`)
the gaps between consecutive step results, which every sequence of the later step waited:
the inter-token latency as the worker makes it, before the scheduler, the tokenizer and
the network add theirs.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.arguments import benchmark_parser

# Decode steps by batch size (None: no upper bound): the tail of a run (few sequences,
# steps of 1-3 ms) behaves unlike its bulk.
DECODE_BANDS = ((1, 15), (16, 47), (48, 127), (128, None))
PREFILL_BAND = "prefill/mixed"
BAND_NAMES = [PREFILL_BAND] + [
    f"decode {low}+" if high is None else f"decode {low}-{high}" for low, high in DECODE_BANDS
]


def read_steps(path: Path, start_s: float = float("-inf"), end_s: float = float("inf")) -> list[dict]:
    """The steps the device computed between start_s and end_s (host clock), in order."""
    steps = []
    for line in path.read_text().splitlines():
        step = json.loads(line)
        if step["device"] is not None and start_s <= step["device"][0] and step["device"][1] <= end_s:
            steps.append(step)
    return sorted(steps, key=lambda step: step["device"][0])


def _band(step: dict) -> str:
    if step["kind"] != "decode":
        return PREFILL_BAND
    index = next(
        i
        for i, (low, high) in enumerate(DECODE_BANDS)
        if low <= step["num_seqs"] and (high is None or step["num_seqs"] <= high)
    )
    return BAND_NAMES[1 + index]


def summarize_steps(steps: list[dict], start_s: float | None = None) -> dict:
    """Totals over the steps (idle: gaps between one step's device end and the next one's
    start, and before the first from start_s) and, by band, sums and per-step medians."""
    if not steps:
        return {"steps": 0}
    first_start = steps[0]["device"][0]
    busy = sum(step["device"][1] - step["device"][0] for step in steps)
    span = steps[-1]["device"][1] - first_start
    bands: dict[str, dict[str, list[float]]] = {}
    previous_end = first_start if start_s is None else start_s
    for step in steps:
        begin, end = step["device"]
        values = bands.setdefault(_band(step), {"device": [], "launch": [], "idle": []})
        values["device"].append(end - begin)
        values["launch"].append(step["launch"][1] - step["launch"][0])
        values["idle"].append(max(begin - previous_end, 0.0))
        previous_end = end
    return {
        "steps": len(steps),
        "device_busy_s": busy,
        "device_idle_s": span - busy + (first_start - start_s if start_s is not None else 0.0),
        "bands": {
            name: {
                "steps": len(bands[name]["device"]),
                "device_s": sum(bands[name]["device"]),
                "idle_before_s": sum(bands[name]["idle"]),
                "median_device_ms": 1e3 * statistics.median(bands[name]["device"]),
                "median_launch_ms": 1e3 * statistics.median(bands[name]["launch"]),
            }
            for name in BAND_NAMES
            if name in bands
        },
    }


def format_summary(summary: dict) -> str:
    if not summary["steps"]:
        return "no steps"
    lines = [
        f"{summary['steps']} steps: device busy {summary['device_busy_s']:.3f} s, "
        f"idle {summary['device_idle_s']:.3f} s",
        f"  {'steps':16} {'n':>5} {'device s':>9} {'idle s':>7} {'ms/step':>8} {'launch ms':>10}",
    ]
    for name, band in summary["bands"].items():
        lines.append(
            f"  {name:16} {band['steps']:>5} {band['device_s']:>9.3f} {band['idle_before_s']:>7.3f} "
            f"{band['median_device_ms']:>8.2f} {band['median_launch_ms']:>10.2f}"
        )
    return "\n".join(lines)


# A pause this long between two results ends a run: the server waited for requests.
RUN_PAUSE_S = 1.0


def split_runs(steps: list[dict]) -> list[list[dict]]:
    """The steps in runs, by result time, a pause of RUN_PAUSE_S or more between runs."""
    ordered = sorted(steps, key=lambda step: step["finished"])
    runs: list[list[dict]] = []
    for step in ordered:
        if not runs or step["finished"] - runs[-1][-1]["finished"] >= RUN_PAUSE_S:
            runs.append([])
        runs[-1].append(step)
    return runs


def result_gaps(steps: list[dict]) -> dict:
    """Gaps between consecutive results, each counted once per sequence of the later step
    (each of them waited it): p50 and p99 in ms, and the share of the gaps over twice the
    median that a step with prompt tokens ended. Beside them, how long results took to be
    ready after the device was done with their step (p50, p99 over steps): host time
    that the gaps carry on top of the device's."""
    weighted = sorted(
        (1e3 * (later["finished"] - earlier["finished"]), later["num_seqs"], later["kind"] != "decode")
        for earlier, later in zip(steps, steps[1:])
    )
    total = sum(count for _, count, _ in weighted)
    if not total:
        return {"gaps": 0}

    def percentile(share: float) -> float:
        seen = 0
        for gap, count, _ in weighted:
            seen += count
            if seen >= share * total:
                return gap
        return weighted[-1][0]

    median = percentile(0.5)
    after_device = sorted(
        1e3 * (step["finished"] - step["device"][1]) for step in steps if step.get("device")
    )
    long_gaps = [(count, prompt) for gap, count, prompt in weighted if gap > 2 * median]
    long_total = sum(count for count, _ in long_gaps)
    return {
        "gaps": total,
        "p50_ms": median,
        "p99_ms": percentile(0.99),
        "over_twice_median": long_total / total,
        "over_twice_median_with_prompts": (
            sum(count for count, prompt in long_gaps if prompt) / long_total if long_total else 0.0
        ),
        "ready_after_device_p50_ms": _at(after_device, 0.5),
        "ready_after_device_p99_ms": _at(after_device, 0.99),
    }


def _at(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def format_result_gaps(gaps: dict) -> str:
    if not gaps["gaps"]:
        return "run: no gaps"
    return (
        f"run: {gaps['gaps']} sequence gaps, p50 {gaps['p50_ms']:.2f} ms, p99 {gaps['p99_ms']:.2f} ms "
        f"({gaps['p99_ms'] / gaps['p50_ms']:.2f}x); over twice the median "
        f"{100 * gaps['over_twice_median']:.2f}%, {100 * gaps['over_twice_median_with_prompts']:.0f}% "
        "of them ended by a step with prompt tokens; results ready after the device "
        f"p50 {gaps['ready_after_device_p50_ms']:.2f} ms, p99 {gaps['ready_after_device_p99_ms']:.2f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("timeline", type=Path, help="a worker's --step-timeline file")
    args = parser.parse_args(argv)
    steps = read_steps(args.timeline)
    print(format_summary(summarize_steps(steps)))
    for run in split_runs(steps):
        print(format_result_gaps(result_gaps(run)))


if __name__ == "__main__":
    main()
