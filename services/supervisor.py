"""How `pagedserve serve` keeps its services up: a service that exits, or that stops
answering its liveness check for hang_timeout_s (a stopped or hung process, killed
first), is started again after an exponential backoff, logged and counted in
`pagedserve_service_restarts_total`; one that needs more than max_restarts within
restart_window_s cannot run, and serve gives up. The ranks of a parallel engine are
restarted together: a torch.distributed group cannot take one rank back, so when one
fails the others are killed and the whole group meets again.

What the peers do meanwhile: a scheduler whose workers restart holds its requests and
recomputes them once they serve again; a tokenizer whose scheduler restarts moves its
requests to the restarted one (or another engine) with the tokens already streamed."""

import logging
import signal
import subprocess
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorConfig:
    # Restarts of one service within restart_window_s past which it is given up.
    max_restarts: int = 5
    restart_window_s: float = 300.0
    # Seconds a service that answered once may leave its liveness check unanswered
    # before it is killed and restarted.
    hang_timeout_s: float = 30.0
    # The first restart waits this long, each further one within the window twice as long.
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0


class RestartBudget:
    """When a failed service may start again: after a backoff that doubles with each
    restart in the window, or never once max_restarts are used up."""

    def __init__(self, config: SupervisorConfig) -> None:
        self._config = config
        self._restarts: dict[str, deque[float]] = defaultdict(deque)

    def next_start(self, name: str, now: float) -> float | None:
        """The time `name`, failed at `now`, starts again; None: give it up. Counts it."""
        restarts = self._restarts[name]
        while restarts and now - restarts[0] > self._config.restart_window_s:
            restarts.popleft()
        if len(restarts) >= self._config.max_restarts:
            return None
        backoff: float = min(self._config.max_backoff_s, self._config.initial_backoff_s * 2 ** len(restarts))
        restarts.append(now)
        return now + backoff


# How often each service's liveness is asked.
_LIVENESS_INTERVAL_S = 1.0

# Asks whether the service at an address answers its liveness check.
IsAlive = Callable[[str], bool]


class Supervisor:
    def __init__(
        self,
        commands: Mapping[str, list[str]],
        addresses: Mapping[str, str],
        groups: Sequence[Sequence[str]],
        config: SupervisorConfig,
        is_alive: IsAlive,
        registry: CollectorRegistry | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """groups: services restarted together (the ranks of one parallel engine); env:
        the services' environment (the secrets they share ride in it)."""
        self._commands = commands
        self._env = env
        self._addresses = addresses
        self._group_of = {name: tuple(group) for group in groups for name in group}
        self._config = config
        self._is_alive = is_alive
        self._budget = RestartBudget(config)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # Services waiting to start again, and when.
        self._pending: dict[str, float] = {}
        # When each running service last answered its liveness check (None: not yet), and
        # when it is asked next.
        self._last_alive: dict[str, float | None] = {}
        self._next_liveness_check: dict[str, float] = {}
        self.restarts = Counter(
            "pagedserve_service_restarts",
            "Services that `pagedserve serve` started again after they exited or hung.",
            ["service", "reason"],
            registry=registry,
        )

    def start_all(self) -> None:
        for name in self._commands:
            self._start(name)

    def _start(self, name: str) -> None:
        # Children ignore the terminal's Ctrl-C (own process group); serve stops them in
        # order instead.
        self.processes[name] = subprocess.Popen(self._commands[name], start_new_session=True, env=self._env)
        self._last_alive[name] = None
        log.info("started %s (pid %d)", name, self.processes[name].pid)

    def check(self, now: float) -> bool:
        """Restarts what exited or hung, starts what is due; False once a service has
        failed more often than it may."""
        for name, process in list(self.processes.items()):
            if name in self._pending:
                continue
            code = process.poll()
            if code is not None:
                log.warning("%s exited with %d", name, code)
                if not self._schedule_restart(name, "exit", now):
                    return False
            elif self._hung(name, now):
                log.error(
                    "%s has not answered its liveness check for %.0fs: killing it",
                    name,
                    self._config.hang_timeout_s,
                )
                process.kill()
                process.wait()
                if not self._schedule_restart(name, "hang", now):
                    return False
        for name, due in list(self._pending.items()):
            if now >= due:
                del self._pending[name]
                self._start(name)
        return True

    def _hung(self, name: str, now: float) -> bool:
        if now < self._next_liveness_check.get(name, 0.0):
            return False
        self._next_liveness_check[name] = now + _LIVENESS_INTERVAL_S
        if self._is_alive(self._addresses[name]):
            self._last_alive[name] = now
            return False
        last = self._last_alive[name]
        return last is not None and now - last > self._config.hang_timeout_s

    def _schedule_restart(self, name: str, reason: str, now: float) -> bool:
        """Plans the restart of `name` and of the rest of its group (killed now)."""
        due = self._budget.next_start(name, now)
        if due is None:
            log.error(
                "%s failed %d times within %.0fs: giving up",
                name,
                self._config.max_restarts + 1,
                self._config.restart_window_s,
            )
            return False
        for member in self._group_of.get(name, (name,)):
            process = self.processes[member]
            if member != name and process.poll() is None:
                log.warning("stopping %s too: its parallel group restarts whole", member)
                process.kill()
                process.wait()
            self._pending[member] = due
        self.restarts.labels(service=name, reason=reason).inc()
        log.warning("restarting %s in %.1fs", name, due - now)
        return True

    def stop(self, order: Callable[[str], int], timeout_s: float) -> None:
        """Stops the services in `order` (see stop_services)."""
        stop_services(self.processes, timeout_s, order)


def stop_services(
    processes: Mapping[str, subprocess.Popen[bytes]], timeout_s: float, order: Callable[[str], int]
) -> None:
    """Stops the services one after another in `order` (serve's: tokenizers, then
    schedulers, then workers): SIGTERM, up to timeout_s for each to drain and exit, then
    SIGKILL."""
    for name in sorted(processes, key=order):
        process = processes[name]
        if process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
