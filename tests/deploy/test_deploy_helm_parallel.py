"""The Helm chart's parallel engines: one worker container per rank in the engine pod,
wired to the scheduler in rank order, meeting on localhost. The generic rules of
test_deploy_helm.py (schema, probes, drains, CLI arguments) run on these renders too
(value sets "tp2" and "tp2pp2")."""

import re

import pytest

from services.cli import build_parser
from tests.support.helm_chart import (
    CHART,
    REPO,
    engine_containers,
    engine_pods,
    flag,
    of_kind,
    render,
    rendered,
    run_helm,
    worker_containers,
)


@pytest.mark.parametrize("value_set, tensor, pipeline", [("tp2", 2, 1), ("tp2pp2", 2, 2)])
def test_a_parallel_engine_has_one_worker_container_per_rank(value_set, tensor, pipeline):
    (engine,) = engine_pods(rendered(value_set))
    workers = worker_containers(engine)
    parsed = [build_parser().parse_args(worker["args"]) for worker in workers]
    assert [args.rank for args in parsed] == list(range(tensor * pipeline))
    assert [w["name"] for w in workers] == ["worker"] + [f"worker{r}" for r in range(1, tensor * pipeline)]
    assert {(args.tensor_parallel_size, args.pipeline_parallel_size) for args in parsed} == {
        (tensor, pipeline)
    }
    # The ranks meet at rank 0's port on localhost: the pod shares one network namespace.
    (rendezvous,) = {args.dist_init_addr for args in parsed}
    assert rendezvous.startswith("localhost:")
    ports = [args.port for args in parsed]
    metrics_ports = [args.metrics_port for args in parsed]
    assert ports == [ports[0] + rank for rank in range(len(parsed))]
    assert metrics_ports == [metrics_ports[0] + rank for rank in range(len(parsed))]
    taken = ports + metrics_ports + [int(rendezvous.rsplit(":", 1)[1])]
    for container in engine_containers(engine).values():
        if container["args"][0] == "scheduler":
            taken += [p["containerPort"] for p in container["ports"]]
    assert len(taken) == len(set(taken)), taken
    # NCCL between the ranks' containers goes through the pod's shared memory.
    volumes = {v["name"]: v for v in engine["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    for worker in workers:
        assert {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}["shm"] == "/dev/shm"


def test_a_tensor_parallel_gpu_engine_gives_each_rank_its_own_gpu():
    (engine,) = engine_pods(rendered("tp2"))
    workers = worker_containers(engine)
    assert len(workers) == 2
    for worker in workers:
        # One GPU per container: each rank sees exactly one device and takes it.
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert flag(worker["args"], "--device") == "cuda"
    assert "nvidia.com/gpu" not in engine_containers(engine)["scheduler"]["resources"].get("limits", {})


def test_service_monitor_scrapes_every_rank():
    docs = rendered("tp2pp2")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    scraped = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    (engine,) = engine_pods(docs)
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    engine_service = next(s for name, s in services.items() if name.endswith("-scheduler"))
    by_target = {p["targetPort"]: p["port"] for p in engine_service["spec"]["ports"]}
    for worker in worker_containers(engine):
        (metrics_port,) = [p for p in worker["ports"] if p["name"].startswith("metrics")]
        assert metrics_port["name"] in scraped, worker["name"]
        assert by_target[metrics_port["name"]] == metrics_port["containerPort"]


def test_single_rank_engine_has_no_parallel_flags():
    # An engine of one rank renders as before parallelism existed: no rendezvous, no /dev/shm.
    (engine,) = engine_pods(rendered("default"))
    (worker,) = worker_containers(engine)
    assert flag(worker["args"], "--dist-init-addr") is None
    assert "shm" not in {v["name"] for v in engine["volumes"]}


def test_more_ranks_than_a_node_holds_are_refused_by_name():
    # `helm lint` prints a template's failure yet exits 0; rendering fails outright.
    result = run_helm(
        "template",
        str(CHART),
        "--set",
        "engine.worker.tensorParallelSize=4",
        "--set",
        "engine.worker.pipelineParallelSize=4",
    )
    assert result.returncode != 0
    assert "tensorParallelSize x pipelineParallelSize is 16 ranks" in result.stdout + result.stderr


def test_schema_rejects_a_parallel_size_of_zero():
    result = run_helm("lint", "--strict", str(CHART), "--set", "engine.worker.tensorParallelSize=0")
    assert result.returncode != 0
    assert "tensorParallelSize" in result.stdout + result.stderr


def test_the_commented_tensor_parallel_example_renders_two_ranks(tmp_path):
    example = re.sub(
        r"^(\s*)# ((tensor|pipeline)ParallelSize: \d+)$",
        r"\1\2",
        (REPO / "helm" / "values-gpu.yaml").read_text(),
        flags=re.MULTILINE,
    )
    values = tmp_path / "values-tp2.yaml"
    values.write_text(example)
    (engine,) = engine_pods(render("-f", str(values)))
    assert [flag(w["args"], "--rank") for w in worker_containers(engine)] == ["0", "1"]
