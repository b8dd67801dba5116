"""How `pagedserve serve` restarts what fails (services/supervisor.py), with real child
processes: backoff and the restart limit, a parallel group restarted whole, the restart
counter."""

import sys
import time

from prometheus_client import CollectorRegistry

from services.supervisor import RestartBudget, Supervisor, SupervisorConfig

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_backoff_doubles_within_the_window_and_the_limit_gives_up() -> None:
    budget = RestartBudget(SupervisorConfig(max_restarts=3, restart_window_s=100, initial_backoff_s=1))
    assert [budget.next_start("s", 0.0), budget.next_start("s", 1.0), budget.next_start("s", 3.0)] == [
        1,
        3,
        7,
    ]
    assert budget.next_start("s", 10.0) is None
    assert budget.next_start("other", 10.0) == 11.0
    # Restarts older than the window no longer count.
    assert budget.next_start("s", 150.0) == 151.0


def _supervisor(
    commands: dict[str, list[str]], groups: list[list[str]], registry: CollectorRegistry
) -> Supervisor:
    config = SupervisorConfig(max_restarts=2, restart_window_s=60, initial_backoff_s=0.1)
    addresses = {name: "127.0.0.1:1" for name in commands}
    return Supervisor(commands, addresses, groups, config, is_alive=lambda address: True, registry=registry)


def _run_until(supervisor: Supervisor, done, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not supervisor.check(time.monotonic()):
            return False
        if done():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_dead_service_restarts_and_counts_and_its_group_restarts_whole() -> None:
    registry = CollectorRegistry()
    commands = {"scheduler": SLEEPER, "worker": SLEEPER, "worker1": SLEEPER}
    supervisor = _supervisor(commands, [["worker", "worker1"]], registry)
    supervisor.start_all()
    try:
        first = {name: process.pid for name, process in supervisor.processes.items()}
        supervisor.processes["worker1"].kill()
        assert _run_until(
            supervisor,
            lambda: all(supervisor.processes[n].pid != first[n] for n in ("worker", "worker1")),
        )
        assert supervisor.processes["scheduler"].pid == first["scheduler"]
        assert all(process.poll() is None for process in supervisor.processes.values())
        counted = registry.get_sample_value(
            "pagedserve_service_restarts_total", {"service": "worker1", "reason": "exit"}
        )
        assert counted == 1.0
    finally:
        supervisor.stop(lambda name: 0, 5)


def test_a_service_that_keeps_dying_is_given_up() -> None:
    supervisor = _supervisor(
        {"crashes": [sys.executable, "-c", "raise SystemExit(3)"]}, [], CollectorRegistry()
    )
    supervisor.start_all()
    try:
        assert not _run_until(supervisor, lambda: False)
    finally:
        supervisor.stop(lambda name: 0, 5)
