"""What the services cost per token, without a model: the scheduler and tokenizer services
in front of a worker that computes nothing (each step takes --step-ms of pretend device
time, queued like a GPU's), on the nano-vllm workload.

    python -m benchmarks.service_overhead --step-ms 4.4            # the H200's decode step
    python -m benchmarks.service_overhead --num-seqs 64 --no-overlap-scheduling

Prints output tokens per second and the CPU seconds each process spent, so that the
process that limits the gRPC stack shows, and writes them to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.pagedserve_runs import EngineSettings, _generate_all, _service_commands, cpu_seconds, run_clients
from benchmarks.workload import nano_vllm_workload
from pagedserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.launcher import free_port, wait_until_serving


class _PretendLaunch:
    def __init__(self, step_id: int, done_at: float, samples: list[tuple[int, int]]) -> None:
        self.step_id, self.done_at, self.samples = step_id, done_at, samples

    def wait(self) -> None:
        time.sleep(max(0.0, self.done_at - time.perf_counter()))


class NullRunner:
    """Speaks the worker's step protocol and samples a fixed token per sequence; steps
    take step_seconds each, one after another, as on a device."""

    decode_graphs = None

    def __init__(self, step_seconds: float, vocab_size: int, max_model_len: int) -> None:
        self.step_seconds = step_seconds
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # seq_id -> [tokens known or sampled, tokens computed]
        self.sequences: dict[int, list[int]] = {}
        self._device_free_at = 0.0

    def info(self) -> worker_pb2.WorkerInfo:
        model = common_pb2.ModelInfo(model_name="null", architecture="null", max_model_len=self.max_model_len,
                                     vocab_size=self.vocab_size, eos_token_ids=[0])
        return worker_pb2.WorkerInfo(model=model, num_kv_blocks=1 << 20, block_size=16, device="none",
                                     dtype="none")

    def reset(self) -> None:
        self.sequences.clear()

    def launch_step(self, step: worker_pb2.StepRequest) -> _PretendLaunch:
        for seq_id in step.finished_seq_ids:
            self.sequences.pop(seq_id, None)
        for new in step.new_sequences:
            self.sequences[new.seq_id] = [len(new.token_ids), new.num_computed_tokens]
        samples = []
        for entry in step.scheduled:
            state = self.sequences[entry.seq_id]
            state[1] += entry.num_new_tokens
            if state[1] == state[0]:
                state[0] += 1
                samples.append((entry.seq_id, 1000 + entry.seq_id % 1000))
        start = max(time.perf_counter(), self._device_free_at)
        self._device_free_at = start + (self.step_seconds if step.scheduled else 0.0)
        return _PretendLaunch(step.step_id, self._device_free_at, samples)

    def finish_step(self, launched: _PretendLaunch) -> worker_pb2.StepResult:
        launched.wait()
        result = worker_pb2.StepResult(step_id=launched.step_id)
        for seq_id, token_id in launched.samples:
            result.seq_ids.append(seq_id)
            result.token_ids.append(token_id)
        return result


async def _serve_null_worker(port: int, step_seconds: float, vocab_size: int, max_model_len: int) -> None:
    from gpu_worker.servicer import WorkerServicer
    from gpu_worker.step_telemetry import StepTelemetry
    from services.common.grpc_server import ServerConfig, ServiceHost

    name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    host = ServiceHost(ServerConfig(host="127.0.0.1", port=port, shutdown_grace_s=1.0), [name])
    servicer = WorkerServicer(StepTelemetry(host.registry))
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, host.server)
    await host.start()

    async def load() -> None:
        await servicer.load(lambda: NullRunner(step_seconds, vocab_size, max_model_len))

    await host.run(prepare=load)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=4.4, help="pretend device time per step")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--no-overlap-scheduling", dest="overlap", action="store_false")
    parser.add_argument("--max-stream-messages-per-step", type=int, default=32, help="0: no limit")
    parser.add_argument("--model", type=Path, default=None, help="tokenizer's model directory; default: embedded")
    parser.add_argument("--json", type=Path, default=Path("service_overhead.json"))
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="run the scheduler and tokenizer under cProfile, writing NAME.prof here")
    parser.add_argument("--serve-null-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_null_worker is not None:
        asyncio.run(_serve_null_worker(args.serve_null_worker, args.step_ms / 1e3, 49152, 4096))
        return

    from services.common.embedded_model import materialize_default_model

    model_dir = args.model or materialize_default_model()
    workload = nano_vllm_workload(args.num_seqs, 100, 1024, 10000)
    ports = {name: free_port() for name in ("worker", "scheduler", "tokenizer")}
    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    settings = EngineSettings(device="cpu", max_steps_in_flight=EngineSettings.max_steps_in_flight if args.overlap else 1,
                              max_stream_messages_per_step=args.max_stream_messages_per_step)
    commands = _service_commands(model_dir, settings, ports)
    commands["worker"] = [sys.executable, "-m", "benchmarks.service_overhead", "--step-ms", str(args.step_ms),
                          "--serve-null-worker", str(ports["worker"])]
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        for name in ("scheduler", "tokenizer"):
            profiled = [sys.executable, "-m", "cProfile", "-o", str(args.profile_dir / f"{name}.prof")]
            commands[name] = [*profiled, *commands[name][1:]]
    log_dir = Path("/tmp") / f"service_overhead_{os.getpid()}"
    log_dir.mkdir(exist_ok=True)
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            log = open(log_dir / f"{name}.log", "w")
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until_serving(processes, addresses, log_dir, 120.0)
        asyncio.run(_generate_all(addresses["tokenizer"], [(f"w{i}", [1 + i] * 50, 8) for i in range(2)]))
        requests = [
            (f"r{i}", prompt, n) for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lengths))
        ]
        cpu_before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
        outputs, seconds = run_clients(addresses["tokenizer"], requests, args.clients)
        cpu = {name: cpu_seconds(p.pid) - cpu_before[name] for name, p in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    tokens = sum(len(tokens) for tokens in outputs.values())
    summary = {
        "step_ms": args.step_ms, "overlap_scheduling": args.overlap, "num_seqs": args.num_seqs,
        "max_stream_messages_per_step": args.max_stream_messages_per_step,
        "output_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
        "cpu_seconds": cpu, "cpu_us_per_token": {name: 1e6 * s / tokens for name, s in cpu.items()},
    }
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"{tokens:,} tokens in {seconds:.2f} s: {tokens / seconds:,.0f} tok/s "
          f"(step {args.step_ms} ms, overlap {'on' if args.overlap else 'off'}, "
          f"{args.max_stream_messages_per_step or 'unlimited'} messages per step)")
    for name, seconds_used in cpu.items():
        print(f"  {name:10} {seconds_used:6.2f} CPU s  {1e6 * seconds_used / tokens:6.1f} us/token")


if __name__ == "__main__":
    main()
