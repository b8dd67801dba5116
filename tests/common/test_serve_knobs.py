"""`pagedserve serve` hands each scheduling knob to the service that owns it."""

import argparse
from pathlib import Path

from services.cli import build_parser
from services.launcher import service_commands
from services.security_args import API_KEY_ENV, INTERNAL_TOKEN_ENV, service_env


def _commands(*flags: str) -> dict[str, list[str]]:
    args = build_parser().parse_args(["serve", "--model", "/models/m", *flags])
    return service_commands(args, Path("/models/m"), {"worker": 1, "scheduler": 2})


def _value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_knobs_reach_their_services() -> None:
    commands = _commands(
        "--block-size",
        "32",
        "--num-kv-blocks",
        "100",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "64",
        "--preemption-mode",
        "swap",
        "--swap-space",
        "0.5",
        "--max-waiting-requests",
        "3",
        "--no-prefix-caching",
        "--no-overlap-scheduling",
        "--max-stream-messages-per-step",
        "0",
    )
    worker, scheduler = commands["worker"], commands["scheduler"]
    assert (_value(worker, "--block-size"), _value(worker, "--swap-space")) == ("32", "0.5")
    assert _value(worker, "--num-kv-blocks") == _value(scheduler, "--num-kv-blocks") == "100"
    # The worker is built for the step's size; the scheduler adopts the worker's.
    assert _value(worker, "--max-num-seqs") == "8" and _value(worker, "--max-num-batched-tokens") == "64"
    assert "--max-num-seqs" not in scheduler and "--max-num-batched-tokens" not in scheduler
    assert _value(scheduler, "--preemption-mode") == "swap"
    assert _value(scheduler, "--max-waiting-requests") == "3"
    assert "--no-prefix-caching" in scheduler and "--no-overlap-scheduling" in scheduler
    assert _value(scheduler, "--max-stream-messages-per-step") == "0"
    # Each service's own parser accepts what it is given.
    parser = build_parser()
    for name in ("worker", "scheduler"):
        command = commands[name]
        parser.parse_args(command[command.index(name) :])


def test_defaults() -> None:
    commands = _commands()
    scheduler = commands["scheduler"]
    assert _value(scheduler, "--preemption-mode") == "recompute"
    assert "--no-prefix-caching" not in scheduler and "--max-waiting-requests" not in scheduler
    assert "--no-overlap-scheduling" not in scheduler
    args = build_parser().parse_args(["scheduler", "--worker", "w:1"])
    assert args.enable_prefix_caching and args.max_waiting_requests is None and args.overlap_scheduling
    assert args.max_stream_messages_per_step == 32 and args.max_steps_in_flight is None
    assert build_parser().parse_args(["worker"]).swap_space == 4.0


def test_every_serve_option_reaches_a_service() -> None:
    """A serve option no service receives would be accepted and silently ignored."""
    parser = build_parser()
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]
    # --engines and --tokenizers shape the layout (test_replicas_get_their_own_services);
    # secrets travel in the services' environment (test_secrets_travel_in_the_environment).
    launcher_own = {
        "api_key",
        "internal_token",
        "internal_token_file",
        "help",
        "host",
        "port",
        "model",
        "shutdown_grace",
        "metrics_port",
        "engines",
        "tokenizers",
        # How serve restarts what fails (tests/common/test_supervisor.py).
        "max_restarts",
        "restart_window",
        "hang_timeout",
    }
    for action in serve_parser._actions:
        if action.dest in launcher_own:
            continue
        if action.nargs == 0:  # a flag; a --x/--no-x pair is given the form that flips it
            expected = not action.default
            flags = [
                action.option_strings[-1]
                if isinstance(action, argparse.BooleanOptionalAction) and not expected
                else action.option_strings[0]
            ]
        else:
            expected = (
                next(c for c in action.choices if c != action.default)
                if action.choices
                else ({int: 7, float: 0.7, Path: Path("x")}.get(action.type, "x"))
            )
            flags = [action.option_strings[0], str(expected)]
        commands = _commands(*flags)
        received = []
        for name, command in commands.items():
            subcommand = name.rstrip("0123456789")  # worker1 runs `pagedserve worker`
            service_args = parser.parse_args(command[command.index(subcommand) :])
            value = getattr(service_args, action.dest, None)
            received.append(value in (expected, [expected]))  # a repeatable option gives a list
        assert any(received), f"{action.option_strings[0]} reaches no service"


def test_a_parallel_engine_gets_a_worker_per_rank_in_rank_order() -> None:
    args = build_parser().parse_args(
        ["serve", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--metrics-port", "9000"]
    )
    ports = {"worker": 1, "scheduler": 2}
    commands = service_commands(args, Path("/models/m"), ports)
    workers = ["worker", "worker1", "worker2", "worker3"]
    assert sorted(commands) == sorted([*workers, "scheduler", "tokenizer"])
    rendezvous = f"127.0.0.1:{ports['rendezvous']}"
    for rank, name in enumerate(workers):
        worker = commands[name]
        assert _value(worker, "--rank") == str(rank)
        assert _value(worker, "--port") == str(ports[name])
        assert _value(worker, "--dist-init-addr") == rendezvous
        assert _value(worker, "--tensor-parallel-size") == "2"
        assert _value(worker, "--pipeline-parallel-size") == "2"
        assert _value(worker, "--metrics-port") == str(9002 + rank)
    scheduler = commands["scheduler"]
    worker_flags = [scheduler[i + 1] for i, flag in enumerate(scheduler) if flag == "--worker"]
    assert worker_flags == [f"127.0.0.1:{ports[name]}" for name in workers]
    assert len({ports[name] for name in workers}) == 4


def test_replicas_get_their_own_services() -> None:
    commands = _commands(
        "--engines", "2", "--tokenizers", "2", "--tensor-parallel-size", "2", "--device", "cuda"
    )
    assert sorted(commands) == sorted(
        ["worker", "worker1", "scheduler", "engine1-worker", "engine1-worker1", "engine1-scheduler"]
        + ["tokenizer", "tokenizer1"]
    )
    schedulers = [commands[name] for name in ("scheduler", "engine1-scheduler")]
    addresses = [f"127.0.0.1:{_value(command, '--port')}" for command in schedulers]
    for name in ("tokenizer", "tokenizer1"):
        tokenizer = commands[name]
        assert [tokenizer[i + 1] for i, flag in enumerate(tokenizer) if flag == "--scheduler"] == addresses
        assert "--reuse-port" in tokenizer and _value(tokenizer, "--port") == "50051"
    # Each engine's ranks see their own GPUs, continuing the numbering.
    assert commands["worker1"][:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1"]
    assert commands["engine1-worker1"][:2] == ["env", "CUDA_VISIBLE_DEVICES=2,3"]
    assert _value(commands["engine1-worker"], "--dist-init-addr") != _value(
        commands["worker"], "--dist-init-addr"
    )
    parser = build_parser()
    for name in ("tokenizer1", "engine1-scheduler", "engine1-worker1"):
        command = commands[name]
        kind = name.rsplit("-", 1)[-1].rstrip("0123456789")
        parser.parse_args(command[command.index(kind) :])


def test_generation_config_choice_reaches_the_tokenizer() -> None:
    parser = build_parser()
    for choice in ("auto", "none"):
        tokenizer = _commands("--generation-config", choice)["tokenizer"]
        assert _value(tokenizer, "--generation-config") == choice
        args = parser.parse_args(tokenizer[tokenizer.index("tokenizer") :])
        assert args.generation_config == choice


def test_secrets_travel_in_the_environment() -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "/models/m", "--api-key", "k1", "--internal-token", "t1"]
    )
    env = service_env(args, {})
    assert env[API_KEY_ENV] == "k1" and env[INTERNAL_TOKEN_ENV] == "t1"
    commands = service_commands(args, Path("/models/m"), {"worker": 1, "scheduler": 2})
    assert not any("k1" in part or "t1" in part for command in commands.values() for part in command)
