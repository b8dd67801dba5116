"""The Helm chart: `helm lint --strict`, `helm template`, every rendered manifest checked
offline against the Kubernetes API schema, and the chart's own rules (gRPC probes, drain
times, resources, wiring between Services and pods, arguments the CLI accepts).

helm comes from `make install` (deploy/install_helm.py); without it these tests fail."""

import kubernetes_validate.utils as kubernetes_validate
import pytest

from services.cli import build_parser
from services.common.grpc_server import LIVENESS_SERVICE
from tests.support.helm_chart import (
    CHART,
    KUBERNETES_VERSION,
    VALUE_SETS,
    WITH_SERVICE_MONITOR,
    containers,
    engine_containers,
    engine_pods,
    flag,
    of_kind,
    rendered,
    run_helm,
    worker_containers,
)

# Resources whose schema is a CRD that kubernetes-validate does not carry.
CUSTOM_KINDS = {"ServiceMonitor"}
MIN_STARTUP_BUDGET_S = 600


def prestop_seconds(container: dict) -> int:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return int(command[1]) if command[:1] == ["sleep"] else 0


def drain_seconds(container: dict) -> float:
    # Absent means the service's own default, which is what the CLI parser gives.
    return build_parser().parse_args(container["args"]).shutdown_grace


value_sets = pytest.mark.parametrize("value_set", VALUE_SETS)


@value_sets
def test_lint_strict(value_set):
    result = run_helm("lint", "--strict", str(CHART), *VALUE_SETS[value_set])
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_rejects_a_misspelled_value():
    result = run_helm("lint", "--strict", str(CHART), "--set", "tokenizer.replica=3")
    assert result.returncode != 0
    assert "replica" in result.stdout + result.stderr


def test_schema_requires_a_volume_for_a_volume_model():
    result = run_helm("lint", "--strict", str(CHART), "--set", "model.source=volume")
    assert result.returncode != 0


@value_sets
def test_manifests_match_the_kubernetes_schema(value_set):
    for doc in rendered(value_set):
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(error.message)


@value_sets
def test_expected_resources_are_rendered(value_set):
    kinds = sorted(doc["kind"] for doc in rendered(value_set))
    for kind in ("ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"):
        assert kind in kinds
    assert kinds.count("Deployment") == 2  # tokenizer; scheduler + worker
    assert ("ServiceMonitor" in kinds) == (value_set in WITH_SERVICE_MONITOR)
    assert ("HorizontalPodAutoscaler" in kinds) == (value_set != "options")


@value_sets
def test_container_arguments_are_accepted_by_the_cli(value_set):
    parser = build_parser()
    for _deployment, container in containers(rendered(value_set)):
        try:
            args = parser.parse_args(container["args"])
        except SystemExit:
            pytest.fail(f"{container['name']}: pagedserve rejects {container['args']}")
        # Ranks past 0 of a parallel engine are "worker1", "worker2", ...
        assert args.command == container["name"].rstrip("0123456789")


@value_sets
def test_every_container_has_grpc_probes_on_its_own_port(value_set):
    for _, container in containers(rendered(value_set)):
        port = int(flag(container["args"], "--port"))
        assert port in {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (container["name"], probe)
        # Readiness follows the model and the peers; liveness only that the process answers.
        assert "service" not in container["readinessProbe"]["grpc"]
        assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        # A restarted container whose peers are down must not be restarted for that.
        assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE


@value_sets
def test_startup_probes_outlast_a_long_model_load(value_set):
    for _, container in containers(rendered(value_set)):
        probe = container["startupProbe"]
        assert probe["failureThreshold"] * probe["periodSeconds"] >= MIN_STARTUP_BUDGET_S


@value_sets
def test_pods_are_not_killed_while_draining(value_set):
    for deployment, container in containers(rendered(value_set)):
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > prestop_seconds(container) + drain_seconds(container), container["name"]


@value_sets
def test_workers_outlive_the_scheduler_drain(value_set):
    # All get SIGTERM when their own preStop ends; the scheduler's drain needs every rank.
    (engine,) = engine_pods(rendered(value_set))
    scheduler = engine_containers(engine)["scheduler"]
    for worker in worker_containers(engine):
        assert prestop_seconds(worker) >= prestop_seconds(scheduler) + drain_seconds(scheduler)


@value_sets
def test_every_container_declares_resources(value_set):
    for _, container in containers(rendered(value_set)):
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
        assert "memory" in resources["limits"], container["name"]


@value_sets
def test_pods_run_as_non_root(value_set):
    for deployment, container in containers(rendered(value_set)):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


@value_sets
def test_tokenizer_reaches_the_scheduler_service(value_set):
    docs = rendered(value_set)
    services = {service["metadata"]["name"]: service for service in of_kind(docs, "Service")}
    by_name = {container["name"]: container for _, container in containers(docs)}
    target = flag(by_name["tokenizer"]["args"], "--scheduler")
    assert target.startswith("dns:///"), "the tokenizers resolve every engine pod's address"
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    assert host in services
    assert services[host]["spec"]["clusterIP"] == "None", "a headless Service resolves to the pods"
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    scheduler_port = int(flag(by_name["scheduler"]["args"], "--port"))
    selected = pods_selected_by(docs, services[host])
    assert any(c["name"] == "scheduler" for c in selected)
    assert scheduler_port in {p["containerPort"] for c in selected for p in c["ports"]}


@value_sets
def test_scheduler_reaches_every_rank_in_its_own_pod_in_rank_order(value_set):
    (engine,) = engine_pods(rendered(value_set))
    scheduler = build_parser().parse_args(engine_containers(engine)["scheduler"]["args"])
    worker_ports = [flag(worker["args"], "--port") for worker in worker_containers(engine)]
    assert [address.rsplit(":", 1) for address in scheduler.worker] == [
        ["localhost", port] for port in worker_ports
    ]


def pods_selected_by(docs, selector_owner: dict) -> list[dict]:
    selector = selector_owner["spec"]["selector"]
    selector = selector.get("matchLabels", selector)
    selected = []
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if selector.items() <= labels.items():
            selected.extend(deployment["spec"]["template"]["spec"]["containers"])
    return selected


@value_sets
def test_services_select_pods_and_named_ports(value_set):
    docs = rendered(value_set)
    for service in of_kind(docs, "Service"):
        selected = pods_selected_by(docs, service)
        assert selected, service["metadata"]["name"]
        port_names = {p["name"] for c in selected for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port["name"])


@value_sets
def test_disruption_budgets_and_autoscaler_point_at_deployments(value_set):
    docs = rendered(value_set)
    for budget in of_kind(docs, "PodDisruptionBudget"):
        assert pods_selected_by(docs, budget), budget["metadata"]["name"]
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    for autoscaler in of_kind(docs, "HorizontalPodAutoscaler"):
        target = deployments[autoscaler["spec"]["scaleTargetRef"]["name"]]
        # A replica count in the Deployment would fight the autoscaler on every upgrade.
        assert "replicas" not in target["spec"]


def test_service_monitor_scrapes_ports_the_services_have():
    docs = rendered("options")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    service_ports = {
        port["name"]
        for service in of_kind(docs, "Service")
        if selector.items() <= service["metadata"]["labels"].items()
        for port in service["spec"]["ports"]
    }
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


def test_model_volume_is_mounted_where_the_model_flag_points():
    for deployment, container in containers(rendered("options")):
        if container["name"] == "scheduler":
            continue
        model = flag(container["args"], "--model")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert model.startswith(mounts["model"] + "/")
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"


def test_trace_export_is_off_without_an_endpoint_and_on_with_one():
    (default_env,) = of_kind(rendered("default"), "ConfigMap")
    assert default_env["data"]["OTEL_SDK_DISABLED"] == "true"
    (options_env,) = of_kind(rendered("options"), "ConfigMap")
    assert options_env["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger-collector:4317"
    assert "OTEL_SDK_DISABLED" not in options_env["data"]


def test_gpu_values_give_each_worker_a_gpu():
    docs = rendered("gpu")
    deployments = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in of_kind(docs, "Deployment")
    }
    engine = deployments["engine"]["spec"]
    assert engine["replicas"] == 2
    pod = engine["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    by_name = {c["name"]: c for c in pod["containers"]}
    worker, scheduler = by_name["worker"], by_name["scheduler"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in scheduler["resources"].get("limits", {})
    assert flag(worker["args"], "--device") == "cuda"
    assert worker["image"] != scheduler["image"]
    (autoscaler,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["minReplicas"] == 3
