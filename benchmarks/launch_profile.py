"""Where the worker's launch of a step spends host time: the in-process engine on the
benchmark workload, with torch's profiler on over windows of steps, and each
ModelRunner.launch_step's host time split by the operations and CUDA runtime calls under
it (self time: what each costs itself, not what it calls).

    python -m benchmarks.launch_profile --device cuda               # Qwen3-0.6B, random weights
    python -m benchmarks.launch_profile --device cpu --num-seqs 4 --lengths 4:8 --windows 12:16

Windows count launch calls from the first, the warm-up's dozen included: the default ones
are the full-batch decode steps early in the run and the small batches of its tail.
Prints, per window, the mean launch time per step and the top entries per step; writes
them to --json. The profiler's own cost inflates every entry somewhat; the split is what
it is for.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.arguments import benchmark_parser
from benchmarks.engine_settings import EngineSettings
from benchmarks.pagedserve_runs import run_in_process
from benchmarks.workload import QWEN3_CONFIG, nano_vllm_workload, write_random_model
from gpu_worker.model_runner import ModelRunner

LAUNCH = "launch_step"


class WindowedLaunchProfiler:
    """Wraps ModelRunner.launch_step: profiles the calls whose index falls in a window."""

    def __init__(self, windows: list[tuple[int, int]], device: str) -> None:
        self.windows = windows
        self.activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.startswith("cuda") else []
        )
        self.num_calls = 0
        self.batch_sizes: dict[tuple[int, int], list[int]] = defaultdict(list)
        self.events: dict[tuple[int, int], list[FunctionEvent]] = {}
        self._profiler: profile | None = None
        launch = ModelRunner.launch_step

        def profiled_launch(runner: ModelRunner, step):
            window = next((w for w in self.windows if w[0] <= self.num_calls < w[1]), None)
            self.num_calls += 1
            if window is None:
                return launch(runner, step)
            if self._profiler is None:
                self._profiler = profile(activities=self.activities)
                self._profiler.start()
            self.batch_sizes[window].append(len(step.scheduled))
            with record_function(LAUNCH):
                launched = launch(runner, step)
            if self.num_calls == window[1]:
                self._profiler.stop()
                self.events[window] = list(self._profiler.events())
                self._profiler = None
            return launched

        # Replaced for the rest of this process, on purpose.
        ModelRunner.launch_step = profiled_launch  # type: ignore[method-assign, assignment]

    def summary(self) -> dict[str, dict]:
        return {
            f"{start}:{end}": _summarize(self.events[(start, end)], self.batch_sizes[(start, end)])
            for start, end in self.windows
            if (start, end) in self.events
        }


def _summarize(events: list[FunctionEvent], batch_sizes: list[int], top: int = 15) -> dict:
    # With CUDA activity on, the profiler lists each range twice: on the host, and as an
    # annotation on the device's timeline; only the host's has the host time.
    launches = [event for event in events if event.name == LAUNCH and event.device_type == DeviceType.CPU]
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for launch in launches:
        self_us[f"{LAUNCH} (Python)"] += launch.self_cpu_time_total
        pending = list(launch.cpu_children)
        while pending:
            event = pending.pop()
            self_us[event.name] += event.self_cpu_time_total
            calls[event.name] += 1
            pending.extend(event.cpu_children)
    num_steps = max(len(launches), 1)
    ranked = sorted(self_us.items(), key=lambda item: -item[1])[:top]
    return {
        "steps": len(launches),
        "batch_sizes": [min(batch_sizes, default=0), max(batch_sizes, default=0)],
        "launch_us_per_step": sum(launch.cpu_time_total for launch in launches) / num_steps,
        "top_self_us_per_step": {name: us / num_steps for name, us in ranked},
        "calls_per_step": {name: calls[name] / num_steps for name, _ in ranked if name in calls},
    }


def _int_pair(text: str) -> tuple[int, int]:
    """ "A:B" as (A, B)."""
    start, end = text.split(":")
    return int(start), int(end)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "launch_profile.json")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument(
        "--model-config", type=Path, default=QWEN3_CONFIG, help="on CUDA: random weights of it"
    )
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument(
        "--lengths", type=_int_pair, default=(100, 1024), help="MIN:MAX input and output lengths"
    )
    parser.add_argument(
        "--windows", default="100:150,1000:1040", help="comma-separated START:END launch calls"
    )
    args = parser.parse_args(argv)
    windows = [_int_pair(text) for text in args.windows.split(",")]
    profiler = WindowedLaunchProfiler(windows, args.device)
    settings = EngineSettings(device=args.device, max_model_len=4096, swap_space=0)
    with tempfile.TemporaryDirectory(prefix="launch-profile-") as scratch:
        if args.device.startswith("cuda"):
            model_dir = write_random_model(args.model_config, Path(scratch) / "model")
        else:
            from services.common.embedded_model import materialize_default_model

            model_dir = materialize_default_model()
        (result,) = run_in_process(model_dir, nano_vllm_workload(args.num_seqs, *args.lengths), settings, [3])
    summary = {
        "device": args.device,
        "num_seqs": args.num_seqs,
        "tokens_per_second": result.tokens_per_second,
        "windows": profiler.summary(),
    }
    args.json.write_text(json.dumps(summary, indent=2))
    for window, entry in summary["windows"].items():
        low, high = entry["batch_sizes"]
        print(
            f"launch calls {window}: {entry['steps']} steps of {low}-{high} sequences, "
            f"{entry['launch_us_per_step']:.0f} us of host time per launch"
        )
        for name, us in entry["top_self_us_per_step"].items():
            count = entry["calls_per_step"].get(name)
            print(f"  {us:8.1f} us  {name}" + (f"  ({count:.1f} calls)" if count is not None else ""))


if __name__ == "__main__":
    main()
