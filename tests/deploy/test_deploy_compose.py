"""docker-compose.yml: `docker-compose config` (Debian's docker-compose 1.29, installed by
deploy/install_ci_tools.sh) accepts it, and the stack's own rules hold: dependencies wait
for health, health checks probe the port each service listens on, Prometheus scrapes
services that exist, Grafana's provisioning points at files that exist.

The rules read compose's own rendering of the file (anchors, merges and ${...} resolved),
so they check what compose would run."""

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser

# docker-compose renders the file the rules read.
pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
# The "tp2" profile's override: the scheduler drives both ranks of a tensor-parallel engine.
TP2_OVERRIDE = REPO / "deploy" / "compose.tp2.yml"
# mTLS, API keys and the internal token from files.
SECURE_OVERRIDE = REPO / "deploy" / "compose.secure.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
GRAFANA_PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
METRIC_NAMES = {
    "pagedserve:num_requests_running",
    "pagedserve:num_requests_waiting",
    "pagedserve:kv_cache_usage_perc",
    "pagedserve:num_preemptions_total",
    "pagedserve:time_to_first_token_seconds_bucket",
    "pagedserve:e2e_request_latency_seconds_bucket",
    "pagedserve:request_success_total",
    "pagedserve:generation_tokens_total",
    "pagedserve:worker_device_seconds_total",
}


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose not found: deploy/install_ci_tools.sh installs Debian's package")
    return found


def run_compose(
    *args: str, env: dict[str, str] | None = None, overrides: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    # Variables the file reads are set explicitly, so the caller's shell cannot change the result.
    environ = {
        key: value for key, value in os.environ.items() if not key.startswith(("COMPOSE_", "PAGEDSERVE_"))
    }
    return subprocess.run(
        [
            docker_compose(),
            "--project-directory",
            str(REPO),
            "-f",
            str(COMPOSE_FILE),
            *(arg for override in overrides for arg in ("-f", str(override))),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **(env or {})},
    )


@functools.cache
def config(worker: str = "") -> dict:
    """Every service, the gpu profile's included."""
    result = run_compose("--profile", "gpu", "config", env={"PAGEDSERVE_WORKER": worker} if worker else None)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def services() -> dict[str, dict]:
    return config()["services"]


def pagedserve_services() -> dict[str, dict]:
    return {name: s for name, s in services().items() if s["image"].split(":")[0].startswith("pagedserve")}


def parse_command(service: dict):
    return build_parser().parse_args(service["command"])


def seconds(duration: str | int | float) -> float:
    """Compose durations: 1m30s, 40s, 500ms."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"([\d.]+)(h|ms|us|m|s)", duration)
    assert "".join(value + unit for value, unit in parts) == duration, duration
    return sum(float(value) * units[unit] for value, unit in parts)


@functools.cache
def tp2_config() -> dict:
    """The stack the "tp2" profile runs: the base file and its override."""
    result = run_compose("--profile", "tp2", "config", overrides=(TP2_OVERRIDE,))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize(
    "profile, overrides",
    [([], ()), (["--profile", "gpu"], ()), (["--profile", "tp2"], (TP2_OVERRIDE,))],
    ids=["default", "gpu", "tp2"],
)
def test_compose_accepts_the_file(profile, overrides):
    result = run_compose(*profile, "config", "-q", overrides=overrides)
    assert result.returncode == 0, result.stderr


def test_gpu_workers_are_only_in_their_profiles():
    # docker-compose 1.29's `config` lists every service whatever the profile, so the
    # profile assignment itself is what is checked.
    in_profiles = {name: s["profiles"] for name, s in services().items() if "profiles" in s}
    assert in_profiles == {"worker-gpu": ["gpu"], "worker-tp0": ["tp2"], "worker-tp1": ["tp2"]}
    for name in in_profiles:
        (device,) = services()[name]["deploy"]["resources"]["reservations"]["devices"]
        assert "gpu" in device["capabilities"]


def test_tp2_scheduler_drives_both_ranks_in_rank_order():
    tp2 = tp2_config()["services"]
    scheduler = parse_command(tp2["scheduler"])
    ranks = {}
    for address in scheduler.worker:
        host, port = address.rsplit(":", 1)
        worker = parse_command(tp2[host])
        assert int(port) == worker.port, address
        ranks[host] = worker
    assert [worker.rank for worker in ranks.values()] == [0, 1]
    assert {(w.tensor_parallel_size, w.pipeline_parallel_size) for w in ranks.values()} == {(2, 1)}
    assert {w.device for w in ranks.values()} == {"cuda"}
    # Both meet at rank 0's rendezvous port, which its service exposes.
    (rendezvous,) = {w.dist_init_addr for w in ranks.values()}
    host, port = rendezvous.rsplit(":", 1)
    rank0 = next(name for name, worker in ranks.items() if worker.rank == 0)
    assert host == rank0
    assert port in {str(p) for p in tp2[rank0]["expose"]}
    # Each rank on a GPU of its own.
    gpus = [
        tuple(device["device_ids"])
        for name in ranks
        for device in tp2[name]["deploy"]["resources"]["reservations"]["devices"]
    ]
    assert len(gpus) == 2 and len(set(gpus)) == 2 and all(len(ids) == 1 for ids in gpus), gpus


def test_tp2_override_changes_only_the_scheduler_command():
    base, tp2 = config()["services"], tp2_config()["services"]
    assert base.keys() == tp2.keys()
    changed = {name for name in base if base[name].get("command") != tp2[name].get("command")}
    assert changed == {"scheduler"}


def test_commands_are_accepted_by_the_cli():
    for name, service in pagedserve_services().items():
        try:
            parse_command(service)
        except SystemExit:
            pytest.fail(f"{name}: pagedserve rejects {service['command']}")


def test_every_pagedserve_service_checks_health_on_its_own_port():
    for name, service in pagedserve_services().items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[2].endswith("healthcheck.py"), name
        assert test[3] == f"localhost:{parse_command(service).port}", name
        # A model load must not turn the container unhealthy, which would fail its dependents.
        assert seconds(service["healthcheck"]["start_period"]) >= 600, name


def test_dependencies_exist_and_wait_for_health():
    all_services = services()
    for name, service in all_services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in all_services, (name, dependency)
            if dependency in pagedserve_services():
                assert condition == {"condition": "service_healthy"}, (name, dependency)
            else:
                assert "condition" in condition, (name, dependency)


def test_tokenizer_and_scheduler_point_at_services():
    by_name = pagedserve_services()
    # The tokenizer takes a list of engines' schedulers.
    (scheduler_address,) = parse_command(by_name["tokenizer"]).scheduler
    scheduler_host, scheduler_port = scheduler_address.rsplit(":", 1)
    assert scheduler_host == "scheduler"
    assert int(scheduler_port) == parse_command(by_name["scheduler"]).port
    for worker in ("worker", "worker-gpu"):
        chosen = config(worker)["services"] if worker == "worker-gpu" else by_name
        (worker_address,) = parse_command(chosen["scheduler"]).worker
        worker_host, worker_port = worker_address.rsplit(":", 1)
        assert worker_host == worker
        assert int(worker_port) == parse_command(by_name[worker]).port


def published_ports(service: dict) -> list[tuple[str, str]]:
    """(host address, host port) of each published port: compose renders a port bound to
    an address as "ADDRESS:PUBLISHED:TARGET/PROTOCOL", the others as mappings."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((port.get("host_ip", "0.0.0.0"), str(port["published"])))
        else:
            host, published, _ = (
                port.rsplit(":", 2) if port.count(":") == 2 else ("0.0.0.0", *port.split(":"))
            )
            ports.append((host, published))
    return ports


def test_published_host_ports_are_unique():
    published = [port for service in services().values() for _, port in published_ports(service)]
    assert len(published) == len(set(published)), published


def test_only_the_public_api_is_published_beyond_this_host():
    beyond = {
        name: port
        for name, service in services().items()
        for host, port in published_ports(service)
        if host != "127.0.0.1"
    }
    assert beyond == {"tokenizer": "50051"}
    assert services()["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_stop_grace_outlasts_the_drain():
    for name, service in pagedserve_services().items():
        assert seconds(service["stop_grace_period"]) > parse_command(service).shutdown_grace, name


def test_services_export_traces_to_jaeger():
    all_services = services()
    for name, service in pagedserve_services().items():
        environment = service["environment"]
        assert environment["OTEL_SERVICE_NAME"].startswith("pagedserve-"), name
        endpoint = re.fullmatch(r"http://([\w-]+):(\d+)", environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint and endpoint.group(1) in all_services, name
        assert endpoint.group(2) == "4317"


def test_prometheus_scrapes_exposed_ports_of_existing_services():
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    all_services = services()
    scraped = set()
    for job in scrape["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in all_services, target
                assert port in {str(p) for p in all_services[host].get("expose", [])}, target
                scraped.add(host)
    assert set(pagedserve_services()) <= scraped


def test_bind_mounts_and_build_files_exist():
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert Path(source).exists(), (name, source)
        if "build" in service:
            assert (Path(service["build"]["context"]) / service["build"]["dockerfile"]).is_file(), name


def test_grafana_provisioning_matches_the_mounts():
    grafana = services()["grafana"]
    mounts = {
        (v["source"] if isinstance(v, dict) else v.split(":")[0]): (
            v["target"] if isinstance(v, dict) else v.split(":")[1]
        )
        for v in grafana["volumes"]
    }
    assert mounts[str(GRAFANA_PROVISIONING)] == "/etc/grafana/provisioning"
    (provider_file,) = (GRAFANA_PROVISIONING / "dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert mounts[str(DASHBOARDS)] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARDS / Path(home).relative_to(provider["options"]["path"])).is_file()


def test_dashboards_query_pagedserve_metrics_from_the_provisioned_datasource():
    (datasource_file,) = (GRAFANA_PROVISIONING / "datasources").glob("*.yml")
    uids = {source["uid"] for source in yaml.safe_load(datasource_file.read_text())["datasources"]}
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    assert dashboards
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"], path.name
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] in uids, (path.name, panel["title"])
            for target in panel["targets"]:
                metrics = set(re.findall(r"pagedserve:[a-z0-9_]+", target["expr"]))
                assert metrics and metrics <= METRIC_NAMES, (path.name, panel["title"], target["expr"])


def test_secure_override_serves_mtls_with_keys_and_token_from_files():
    result = run_compose("config", overrides=(SECURE_OVERRIDE,))
    assert result.returncode == 0, result.stderr
    secure = yaml.safe_load(result.stdout)["services"]
    for name in ("tokenizer", "scheduler", "worker"):
        args = parse_command(secure[name])
        mounts = {
            volume.split(":")[1] if isinstance(volume, str) else volume["target"]
            for volume in secure[name]["volumes"]
        }
        for path in (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs):
            assert path is not None and str(path.parent) in mounts, name
        assert str(args.internal_token_file).startswith("/run/secrets/"), name
        # The health check speaks TLS with the same files, on the service's own port.
        check = secure[name]["healthcheck"]["test"]
        assert check[-3] == f"localhost:{args.port}" and check[-1] == str(args.ssl_certfile.parent), name
    tokenizer = parse_command(secure["tokenizer"])
    assert [str(path) for path in tokenizer.api_key_file] == ["/run/secrets/api-keys"]
