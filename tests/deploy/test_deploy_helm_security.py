"""The chart's security wiring: the NetworkPolicies (only the tokenizers reach the
schedulers, nobody outside the engine pod its workers, metrics from the scraper), and,
with TLS, API keys and the internal token from Secrets, every container's flags,
mounts, environment and TLS-speaking probes.

helm comes from `make install` (deploy/install_helm.py); without it these tests fail."""

import functools

import kubernetes_validate.utils as kubernetes_validate
import pytest

from services.cli import build_parser
from tests.support.helm_chart import KUBERNETES_VERSION, containers, flag, of_kind, render, rendered

SECURE = [
    "--set",
    "security.tls.secretName=pagedserve-tls",
    "--set",
    "security.tls.mutualTls=true",
    "--set",
    "security.apiKeys.secretName=pagedserve-api-keys",
    "--set",
    "security.internalToken.secretName=pagedserve-internal",
    "--set-json",
    'security.networkPolicy.metricsFrom=[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]',
    "--set",
    "engine.worker.tensorParallelSize=2",
]


@functools.cache
def secure() -> tuple[dict, ...]:
    return render(*SECURE)


def _policies(docs) -> dict[str, dict]:
    return {
        doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc
        for doc in of_kind(docs, "NetworkPolicy")
    }


def _pod_labels(docs, component: str) -> dict[str, str]:
    (deployment,) = [
        d
        for d in of_kind(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return deployment["spec"]["template"]["metadata"]["labels"]


def _container_ports(docs, component: str) -> dict[str, int]:
    return {
        port["name"]: port["containerPort"]
        for deployment, container in containers(docs)
        if deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
        for port in container["ports"]
    }


@pytest.mark.parametrize(
    "docs", [pytest.param(lambda: rendered("default"), id="default"), pytest.param(secure, id="secure")]
)
def test_only_the_tokenizers_reach_the_scheduler_and_nobody_the_workers(docs) -> None:
    docs = docs()
    engine = _policies(docs)["engine"]
    engine_labels = _pod_labels(docs, "engine")
    assert engine["spec"]["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert engine["spec"]["policyTypes"] == ["Ingress"]
    ports = _container_ports(docs, "engine")
    allowed: dict[int, list] = {}
    for rule in engine["spec"]["ingress"]:
        for port in rule["ports"]:
            allowed[port["port"]] = rule.get("from")
    # The scheduler's gRPC port: the tokenizer pods only.
    (tokenizers,) = allowed[ports["grpc"]]
    assert tokenizers["podSelector"]["matchLabels"].items() <= _pod_labels(docs, "tokenizer").items()
    assert "namespaceSelector" not in tokenizers
    # The workers' gRPC ports: nobody from outside the pod.
    worker_grpc = [port for name, port in ports.items() if name.startswith("grpc-worker")]
    assert worker_grpc and not set(worker_grpc) & set(allowed)
    # Every metrics port: the scraper.
    metrics = {port for name, port in ports.items() if name.startswith("metrics")}
    assert metrics <= set(allowed)
    assert set(allowed) == {ports["grpc"], *metrics}


def test_the_tokenizer_policy_opens_the_public_and_metrics_ports_only() -> None:
    docs = secure()
    tokenizer = _policies(docs)["tokenizer"]
    assert tokenizer["spec"]["podSelector"]["matchLabels"].items() <= _pod_labels(docs, "tokenizer").items()
    ports = _container_ports(docs, "tokenizer")
    rules = {
        port["port"]: rule.get("from") for rule in tokenizer["spec"]["ingress"] for port in rule["ports"]
    }
    assert rules.keys() == {ports["grpc"], ports["metrics"]}
    assert rules[ports["grpc"]] is None, "the public port is open to any client unless publicFrom says"
    assert rules[ports["metrics"]][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_the_network_policy_can_be_turned_off() -> None:
    assert not of_kind(render("--set", "security.networkPolicy.enabled=false"), "NetworkPolicy")


def test_secure_manifests_match_the_kubernetes_schema() -> None:
    for doc in secure():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_container_serves_mtls_from_the_secret_and_gets_the_token() -> None:
    docs = secure()
    parser = build_parser()
    for deployment, container in containers(docs):
        args = parser.parse_args(container["args"])
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert str(args.ssl_certfile) == f"{mounts['tls']}/tls.crt", container["name"]
        assert str(args.ssl_keyfile) == f"{mounts['tls']}/tls.key"
        assert str(args.ssl_ca_certs) == f"{mounts['tls']}/ca.crt"
        volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "pagedserve-tls"
        (token,) = [env for env in container["env"] if env["name"] == "PAGEDSERVE_INTERNAL_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "pagedserve-internal", "key": "token"}
        # No secret on a command line.
        assert (
            flag(container["args"], "--internal-token") is None
            and flag(container["args"], "--api-key") is None
        )
        # Kubelet's gRPC probes speak no TLS: the image's check does, with the pod's certificate.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "/opt/pagedserve/healthcheck.py"]
            assert command[2] == f"localhost:{args.port}" and command[4] == mounts["tls"]
        assert container["livenessProbe"]["exec"]["command"][3] == "liveness"


def test_tokenizer_reads_the_key_file_and_checks_the_scheduler_certificate_name() -> None:
    docs = secure()
    (tokenizer,) = [container for _, container in containers(docs) if container["name"] == "tokenizer"]
    args = build_parser().parse_args(tokenizer["args"])
    mounts = {mount["name"]: mount["mountPath"] for mount in tokenizer["volumeMounts"]}
    assert [str(path) for path in args.api_key_file] == [f"{mounts['api-keys']}/api-keys"]
    scheduler_host = args.scheduler[0].removeprefix("dns:///").rsplit(":", 1)[0]
    assert args.ssl_server_name == scheduler_host
