"""pagedserve on the benchmark workload: in one process (scheduler and model runner driven
by a plain loop), and as the three gRPC services on loopback with clients in their own
processes (benchmarks/clients.py)."""

from __future__ import annotations

import asyncio
import gc
import os
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.clients import generate_all, greedy_sampling, run_clients
from benchmarks.device import release_memory, synchronize
from benchmarks.engine_settings import EngineSettings
from benchmarks.step_timeline import read_steps, summarize_steps
from benchmarks.workload import Workload
from services.cli import build_parser, worker_config
from services.launcher import free_port, loopback_service_commands, running_services

if TYPE_CHECKING:
    from gpu_worker.step_state import LaunchedStep
    from services.scheduler.outputs import SchedulerOutput
    from services.scheduler.scheduler import Scheduler

DEVICE_SECONDS = "pagedserve:worker_device_seconds_total"
LATE_COMPILES = "pagedserve:worker_late_kernel_compiles_total"
# The worker's counters a gRPC run reads before and after, each by the label it is split by.
WORKER_COUNTERS = {DEVICE_SECONDS: "kind", LATE_COMPILES: "kernel"}
# A run's profile holds, under this prefix and a kernel's name, how many of its variants
# were first compiled during the run (gpu_worker/late_compiles.py).
LATE_COMPILES_KEY = "late_kernel_compiles."


@dataclass
class RunResult:
    name: str
    seconds: float
    output_tokens: int
    # Token ids generated per request, in workload order.
    outputs: list[list[int]] = field(default_factory=list)
    # Where the time went, when the run can tell.
    profile: dict[str, float] = field(default_factory=dict)
    # The run's steps from the worker's step timeline (benchmarks/step_timeline.py).
    timeline: dict = field(default_factory=dict)
    note: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def run_name(base: str, max_steps_in_flight: int) -> str:
    """The run's name; the default depth (EngineSettings') goes unsaid."""
    if max_steps_in_flight == 1:
        return f"{base}, no overlap"
    default = EngineSettings.__dataclass_fields__["max_steps_in_flight"].default
    return base if max_steps_in_flight == default else f"{base}, {max_steps_in_flight} steps in flight"


def run_in_process(
    model_dir: Path, workload: Workload, settings: EngineSettings, steps_in_flight: Sequence[int] = (2,)
) -> list[RunResult]:
    """One run per max_steps_in_flight (1: no overlap), on one model runner."""
    from gpu_worker.model_runner import ModelRunner

    if settings.tensor_parallel_size * settings.pipeline_parallel_size > 1:
        raise SystemExit("an in-process run holds one rank: measure parallel engines with --runs grpc")

    # The worker that `pagedserve serve` with these settings starts.
    ports = dict.fromkeys(("worker", "scheduler", "tokenizer"), 0)
    command = serve_commands(model_dir, settings, ports)["worker"]
    config = worker_config(build_parser().parse_args(command[command.index("worker") :]))
    timeline = settings.step_timeline_dir / "inprocess.jsonl" if settings.step_timeline_dir else None
    runner = ModelRunner(replace(config, step_timeline_path=timeline))
    results = drive_runs(runner, workload, settings, steps_in_flight)
    del runner
    release_memory(settings.device)
    return results


def drive_runs(
    runner, workload: Workload, settings: EngineSettings, steps_in_flight: Sequence[int]
) -> list[RunResult]:
    """The in-process runs on `runner` (a ModelRunner, or anything with its step methods
    and an observer with a device_timer)."""
    from prometheus_client import CollectorRegistry

    from gpu_worker.late_compiles import LateCompiles
    from services.scheduler.scheduler import Scheduler, SchedulerConfig

    info = runner.info()

    def new_scheduler(max_steps_in_flight: int) -> Scheduler:
        return Scheduler(
            SchedulerConfig(
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                max_steps_in_flight=max_steps_in_flight,
                admission_batch_tokens=settings.admission_batch_tokens,
                max_prompt_tokens_with_decodes=settings.max_prompt_tokens_with_decodes or None,
                prompt_tokens_per_decode=settings.prompt_tokens_per_decode,
            ),
            num_blocks=info.num_kv_blocks,
            block_size=info.block_size,
            max_model_len=info.model.max_model_len,
            eos_token_ids=list(info.model.eos_token_ids),
        )

    results = []
    for max_steps_in_flight in steps_in_flight:
        # Warm-up outside the timing: first prefill and decode shapes compile their kernels.
        warm_up = Workload([[1] * 40, [2] * 70], [8, 8])
        drive_engine(runner, new_scheduler(max_steps_in_flight), warm_up, _empty_profile())
        runner.reset()
        gc.freeze()  # as the services do once started (services/common/grpc_server.py)
        scheduler = new_scheduler(max_steps_in_flight)
        profile = _empty_profile()
        synchronize(settings.device)
        device_before = _device_seconds(runner)
        late_compiles = LateCompiles(CollectorRegistry())
        on_gpu = settings.device.startswith("cuda")
        if on_gpu:
            late_compiles.start()
        start = time.perf_counter()
        try:
            outputs = drive_engine(runner, scheduler, workload, profile)
            synchronize(settings.device)
        finally:
            if on_gpu:
                late_compiles.stop()
        seconds = time.perf_counter() - start
        profile.update({LATE_COMPILES_KEY + kernel: n for kernel, n in late_compiles.counts.items()})
        # What the device spent on the run's steps (gpu_worker/device_time.py); the rest of
        # the run it waited for the host.
        for kind, busy in _device_seconds(runner).items():
            profile[f"device_busy_{kind}_s"] = busy - device_before[kind]
        profile["device_busy_s"] = profile["device_busy_decode_s"] + profile["device_busy_prefill_s"]
        runner.reset()
        profile["num_kv_blocks"] = float(info.num_kv_blocks)
        profile["cuda_graphs"] = float(bool(runner.step_graphs))
        name = run_name("pagedserve in-process", max_steps_in_flight)
        result = RunResult(name, seconds, sum(len(o) for o in outputs), outputs, profile)
        timeline = runner.observer.timeline
        if timeline is not None:
            result.timeline = _timeline_summary(timeline.path, start, start + seconds)
        results.append(result)
    return results


def drive_engine(
    runner, scheduler: Scheduler, requests: Workload, profile: dict[str, float]
) -> list[list[int]]:
    """The engine's loop without the network, `scheduler` driving `runner` through every
    request: keeps up to max_steps_in_flight steps launched, so that with overlap the host
    plans and launches step N+1 while the device runs step N. Adds each part's seconds to
    `profile` (_empty_profile's keys); returns each request's tokens, in workload order."""
    outputs: dict[str, list[int]] = {}
    for index, (prompt, num_out) in enumerate(zip(requests.prompts, requests.output_lengths)):
        scheduler.add_request(f"r{index}", prompt, greedy_sampling(num_out))
        outputs[f"r{index}"] = []
    in_flight: deque[tuple[SchedulerOutput, LaunchedStep]] = deque()
    while scheduler.has_unfinished_requests() or in_flight:
        while len(in_flight) < scheduler.max_steps_in_flight:
            t0 = time.perf_counter()
            step = scheduler.schedule()
            if step is None:
                break
            message = step.to_proto()
            t1 = time.perf_counter()
            in_flight.append((step, runner.launch_step(message)))
            t2 = time.perf_counter()
            profile["schedule_s"] += t1 - t0
            profile["launch_s"] += t2 - t1
            profile["steps"] += 1
            profile["decode_steps"] += all(entry.num_new_tokens == 1 for entry in message.scheduled)
        if not in_flight:
            raise RuntimeError("scheduler has unfinished requests but nothing to schedule")
        step, launched = in_flight.popleft()
        t2 = time.perf_counter()
        result = runner.finish_step(launched)
        t3 = time.perf_counter()
        for output in scheduler.update_from_output(step, result):
            outputs[output.request_id].extend(output.new_token_ids)
        t4 = time.perf_counter()
        profile["finish_s"] += t3 - t2
        profile["update_s"] += t4 - t3
    return [outputs[f"r{i}"] for i in range(len(requests.prompts))]


def _timeline_summary(path: Path, start_s: float, end_s: float) -> dict:
    return summarize_steps(read_steps(path, start_s, end_s), start_s)


def _device_seconds(runner) -> dict[str, float]:
    runner.observer.device_timer.resolve()
    return dict(runner.observer.device_timer.seconds)


def _empty_profile() -> dict[str, float]:
    # schedule_s: planning steps; launch_s: building inputs and queueing the device work;
    # finish_s: waiting for a step's tokens (the device time not hidden) and reading them;
    # update_s: applying them in the scheduler.
    return dict.fromkeys(("schedule_s", "launch_s", "finish_s", "update_s", "steps", "decode_steps"), 0.0)


# --- the three services -------------------------------------------------------------------


def serve_commands(model_dir: Path, settings: EngineSettings, ports: dict[str, int]) -> dict[str, list[str]]:
    """What `pagedserve serve` with these settings runs, on these ports."""
    valued = {
        "--device": settings.device,
        "--block-size": settings.block_size,
        "--gpu-memory-utilization": settings.gpu_memory_utilization,
        "--swap-space": settings.swap_space,
        "--max-num-seqs": settings.max_num_seqs,
        "--max-num-batched-tokens": settings.max_num_batched_tokens,
        "--max-steps-in-flight": settings.max_steps_in_flight,
        "--max-stream-messages-per-step": settings.max_stream_messages_per_step,
        "--admission-batch-tokens": settings.admission_batch_tokens,
        "--max-prompt-tokens-with-decodes": settings.max_prompt_tokens_with_decodes,
        "--prompt-tokens-per-decode": settings.prompt_tokens_per_decode,
        "--tokenizers": settings.tokenizers,
        "--max-model-len": settings.max_model_len,
        "--dtype": settings.dtype,
        "--tensor-parallel-size": settings.tensor_parallel_size,
        "--pipeline-parallel-size": settings.pipeline_parallel_size,
        "--load-format": settings.load_format,
        "--kv-cache-dtype": settings.kv_cache_dtype,
        "--quantization": settings.quantization,
    }
    flags = [part for flag, value in valued.items() if value is not None for part in (flag, str(value))]
    flags += ["--enforce-eager"] * settings.enforce_eager
    flags.append("--prefill-graphs" if settings.prefill_graphs else "--no-prefill-graphs")
    if settings.max_steps_in_flight == 1:
        flags.append("--no-overlap-scheduling")
    return loopback_service_commands(model_dir, ports, flags)


def run_grpc(
    model_dir: Path,
    workload: Workload,
    settings: EngineSettings,
    log_dir: Path,
    num_clients: int = 4,
    adjust_commands: Callable[[dict[str, list[str]], dict[str, int]], None] | None = None,
) -> RunResult:
    """adjust_commands(commands, ports) may change the services' command lines (by service
    name) before they start; a worker must listen on ports["worker"] and serve its
    /metrics on ports["worker_metrics"]."""
    ports = {name: free_port() for name in ("worker", "scheduler", "tokenizer")}
    commands = serve_commands(model_dir, settings, ports)
    ports["worker_metrics"] = free_port()
    commands["worker"] += ["--metrics-port", str(ports["worker_metrics"])]
    timeline_path = None
    if settings.step_timeline_dir is not None:
        timeline_path = settings.step_timeline_dir / f"grpc-{settings.max_steps_in_flight}.jsonl"
        commands["worker"] += ["--step-timeline", str(timeline_path)]
    if adjust_commands is not None:
        adjust_commands(commands, ports)
    addresses = {name: f"127.0.0.1:{ports[name]}" for name in commands}
    with running_services(commands, addresses, log_dir, stop_timeout_s=60) as processes:
        # Warm-up: kernels of the first prefill and decode shapes compile in the worker.
        address = addresses["tokenizer"]
        asyncio.run(generate_all(address, [(f"w{i}", [1 + i] * 50, 8) for i in range(2)]))
        requests = [
            (f"r{i}", prompt, num_out)
            for i, (prompt, num_out) in enumerate(zip(workload.prompts, workload.output_lengths))
        ]
        cpu_before = {name: cpu_seconds(process.pid) for name, process in processes.items()}
        counters_before = worker_counters(ports["worker_metrics"])
        outputs, window_start, window_end = run_clients(address, requests, num_clients)
        seconds = window_end - window_start
        counters_after = worker_counters(ports["worker_metrics"])
        device_before, device_after = counters_before[DEVICE_SECONDS], counters_after[DEVICE_SECONDS]
        compiles_before, compiles_after = counters_before[LATE_COMPILES], counters_after[LATE_COMPILES]
        ordered = [outputs[f"r{i}"] for i in range(len(requests))]
        profile = _scheduler_stats(addresses["scheduler"])
        # The worker's device time over the run, as the in-process runs report theirs.
        for kind, busy in device_after.items():
            profile[f"device_busy_{kind}_s"] = busy - device_before.get(kind, 0.0)
        profile["device_busy_s"] = sum(profile[f"device_busy_{kind}_s"] for kind in device_after)
        for kernel, count in compiles_after.items():
            if count > compiles_before.get(kernel, 0.0):
                profile[LATE_COMPILES_KEY + kernel] = count - compiles_before.get(kernel, 0.0)
        # What each service spent on the run, the scheduler's stats call aside.
        profile.update(
            {
                f"cpu_s.{name}": cpu_seconds(process.pid) - cpu_before[name]
                for name, process in processes.items()
            }
        )
    note = f"{num_clients} client processes" + (
        f", {settings.tokenizers} tokenizers" if settings.tokenizers > 1 else ""
    )
    name = run_name("pagedserve gRPC (3 services)", settings.max_steps_in_flight)
    # The worker's file holds the warm-up too; the run's window cuts it off.
    timeline = _timeline_summary(timeline_path, window_start, window_end) if timeline_path else {}
    return RunResult(
        name, seconds, sum(len(o) for o in ordered), ordered, profile, note=note, timeline=timeline
    )


def worker_counters(metrics_port: int) -> dict[str, dict[str, float]]:
    """The worker's WORKER_COUNTERS, each by its label, from one read of its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    counters: dict[str, dict[str, float]] = {name: {} for name in WORKER_COUNTERS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WORKER_COUNTERS:
                counters[sample.name][sample.labels[WORKER_COUNTERS[sample.name]]] = sample.value
    return counters


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scheduler_stats(address: str) -> dict[str, float]:
    """The scheduler's counters after the run (warm-up included)."""
    with grpc.insecure_channel(address) as channel:
        stats = scheduler_pb2_grpc.SchedulerStub(channel).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=30
        )
    return {
        "steps": float(stats.num_steps),
        "num_kv_blocks": float(stats.num_total_blocks),
        "preemptions": float(stats.num_preemptions),
        "generation_tokens": float(stats.num_generation_tokens),
    }
