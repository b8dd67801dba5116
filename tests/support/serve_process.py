"""`pagedserve serve` run as a user runs it, one process that starts and supervises the
services, for tests that kill those services and watch it restart them."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.launcher import free_port


@dataclass
class Served:
    process: subprocess.Popen
    port: int
    # The supervisor's own metrics port.
    metrics_port: int
    log_path: Path
    # The services' metrics ports follow one another from here, the tokenizer's first.
    first_metrics_port: int

    @property
    def public_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _children(self) -> Iterator[tuple[int, list[str]]]:
        listing = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True
        )
        for pid in map(int, listing.stdout.split()):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except FileNotFoundError:
                continue
            yield pid, argv

    def pid_of(self, service: str, rank: int | None = None) -> int:
        """The pid of serve's child running `pagedserve SERVICE` (with --rank RANK)."""
        for pid, argv in self._children():
            if service in argv and (rank is None or argv[argv.index("--rank") + 1] == str(rank)):
                return pid
        raise AssertionError(f"serve runs no {service} {rank if rank is not None else ''}")

    def address_of(self, service: str) -> str:
        argv = Path(f"/proc/{self.pid_of(service)}/cmdline").read_bytes().decode().split("\0")
        return f"127.0.0.1:{argv[argv.index('--port') + 1]}"

    def restarts(self, service: str, reason: str) -> float:
        """pagedserve_service_restarts_total of `service` for `reason`, as serve publishes it."""
        labels = f'{{reason="{reason}",service="{service}"}}'
        return _metric(self.metrics_port, "pagedserve_service_restarts_total" + labels)

    def scheduler_metric(self, name: str) -> float:
        """A metric of the scheduler (of one tokenizer and one engine: the second port)."""
        return _metric(self.first_metrics_port + 1, name)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `condition` held; fails naming `what` after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(0.1)
    return time.monotonic() - start


@contextmanager
def running_serve(model_dir: Path, log_path: Path, flags: list[str]) -> Iterator[Served]:
    """`pagedserve serve --model MODEL_DIR --device cpu FLAGS` on loopback, its output in
    log_path, until it says it serves; SIGTERM at the end."""
    port, metrics_port = free_port(), free_port()
    num_services = 2 + _num_ranks(flags)
    command = [
        *(sys.executable, "-m", "services.cli", "--log-level", "INFO", "serve", "--host", "127.0.0.1"),
        *("--port", str(port), "--model", str(model_dir), "--device", "cpu", "--shutdown-grace", "5"),
        # Each worker fills its CPU swap pool at start-up: a small one, so that a group of
        # ranks fits the machine's memory (as tests/support/service_stack.py does).
        *("--swap-space", "0.25"),
        # The supervisor's metrics follow the services' own.
        *("--metrics-port", str(metrics_port - num_services)),
        *flags,
    ]
    # One compute thread per process: on a small shared machine, threads that spin
    # waiting for each other slow every step many times over.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: "pagedserve serving on port" in log_path.read_text(), 300, "serve ready")
        yield Served(process, port, metrics_port, log_path, metrics_port - num_services)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _num_ranks(flags: list[str]) -> int:
    sizes = {"--tensor-parallel-size": 1, "--pipeline-parallel-size": 1}
    for flag in sizes:
        if flag in flags:
            sizes[flag] = int(flags[flags.index(flag) + 1])
    return sizes["--tensor-parallel-size"] * sizes["--pipeline-parallel-size"]
