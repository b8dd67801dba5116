"""The Helm chart as the deploy tests see it: helm itself, the named value sets the chart
is rendered with, and readers of the rendered manifests.

helm comes from `make install` (deploy/install_helm.py); without it these tests fail."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pagedserve"
KUBERNETES_VERSION = "1.33.0"

VALUE_SETS = {
    "default": [],
    "gpu": ["-f", str(REPO / "helm" / "values-gpu.yaml")],
    # Every optional branch at once: a model volume, trace export, the ServiceMonitor,
    # and a fixed replica count instead of the autoscaler.
    "options": [
        "--set",
        "model.source=volume",
        "--set",
        "model.path=Qwen3-0.6B",
        "--set-json",
        'model.volume={"persistentVolumeClaim": {"claimName": "models", "readOnly": true}}',
        "--set",
        "otel.endpoint=http://jaeger-collector:4317",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "tokenizer.autoscaling.enabled=false",
        "--set",
        "engine.worker.numKvBlocks=512",
        "--set",
        "engine.worker.dtype=bfloat16",
    ],
    # A tensor-parallel engine on GPU nodes: two worker containers, one GPU each.
    "tp2": ["-f", str(REPO / "helm" / "values-gpu.yaml"), "--set", "engine.worker.tensorParallelSize=2"],
    # Two stages of two ranks, with the ServiceMonitor that scrapes every rank.
    "tp2pp2": [
        "--set",
        "engine.worker.tensorParallelSize=2",
        "--set",
        "engine.worker.pipelineParallelSize=2",
        "--set",
        "engine.worker.distTimeoutSeconds=120",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    ],
}
WITH_SERVICE_MONITOR = {"options", "tp2pp2"}


def helm() -> str:
    beside_python = Path(sys.executable).parent / "helm"
    found = str(beside_python) if beside_python.exists() else shutil.which("helm")
    if found is None:
        pytest.fail("helm not found: `make install` puts it in .venv/bin (deploy/install_helm.py)")
    return found


# helm keeps caches and settings under $HOME; the tests keep theirs apart.
_HELM_HOME = tempfile.TemporaryDirectory(prefix="pagedserve-helm-")


def run_helm(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **{f"HELM_{kind}_HOME": f"{_HELM_HOME.name}/{kind.lower()}" for kind in ("CACHE", "CONFIG", "DATA")},
    }
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, env=env)


def render(*values: str) -> tuple[dict, ...]:
    """The chart's manifests with `values` (helm's -f, --set, ... arguments)."""
    result = run_helm(
        "template",
        "pagedserve",
        str(CHART),
        "--namespace",
        "serving",
        "--kube-version",
        KUBERNETES_VERSION,
        *values,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@functools.cache
def rendered(value_set: str) -> tuple[dict, ...]:
    return render(*VALUE_SETS[value_set])


def of_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def containers(docs):
    for deployment in of_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    return None


def engine_pods(docs) -> list[dict]:
    return [
        d["spec"]["template"]["spec"]
        for d in of_kind(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"
    ]


def engine_containers(pod: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod["containers"]}


def worker_containers(pod: dict) -> list[dict]:
    """The engine's worker containers in rank order, as their --rank flags say."""
    workers = [c for c in pod["containers"] if c["args"][0] == "worker"]
    return sorted(workers, key=lambda c: build_parser().parse_args(c["args"]).rank)
