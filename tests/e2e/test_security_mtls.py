"""mTLS on every port and API keys with policies, against one real stack: every service
serves a certificate from a test CA and requires a client certificate from it (the
internal hops present the services' own); the public APIs require a key from a key file
with priority ranges and rate limits; the scheduler checks what Submit receives.
Certificates are written by the `cryptography` library in the test."""

import math
import socket
import ssl
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pagedserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

from services.common.tls import TlsConfig
from services.launcher import free_port
from tests.support.certificates import Authority, issue, make_authority, serial_number, tls_flags
from tests.support.service_stack import Stack, service_stack

KEY_FILE = """
[[key]]
key = "sk-main"
name = "main"
priority = [-10, 100]

[[key]]
key = "sk-narrow"
name = "narrow"
priority = [5, 10]

[[key]]
key = "sk-few-requests"
name = "few-requests"
requests_per_minute = 2

[[key]]
key = "sk-few-tokens"
name = "few-tokens"
tokens_per_minute = 5

[[key]]
key = "sk-http-few"
name = "http-few"
requests_per_minute = 1
"""


class Certificates:
    def __init__(self, directory: Path) -> None:
        self.authority: Authority = make_authority(directory / "ca")
        self.server = issue(self.authority, directory / "server", "server")
        self.client = issue(self.authority, directory / "client", "client")
        stranger_authority = make_authority(directory / "other-ca", "another CA")
        # Signed by another CA, as an outsider's certificate would be.
        self.stranger = issue(stranger_authority, directory / "stranger", "stranger")
        self.directory = directory


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def secure_stack(
    embedded_model_dir: Path, tmp_path_factory, certificates: Certificates, metrics_port: int
) -> Stack:
    key_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    key_file.write_text(KEY_FILE)
    with service_stack(
        embedded_model_dir,
        tmp_path_factory.mktemp("mtls-stack"),
        serve_flags=[*tls_flags(certificates.server), "--api-key-file", str(key_file)],
        tokenizer_args=["--metrics-port", str(metrics_port)],
        http_api=True,
        tls=certificates.client,
    ) as running:
        yield running


def _credentials(tls: TlsConfig, present_certificate: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_certs.read_bytes(),
        private_key=tls.keyfile.read_bytes() if present_certificate else None,
        certificate_chain=tls.certfile.read_bytes() if present_certificate else None,
    )


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _request(max_tokens: int = 1, priority: int = 0) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt="The capital of France is",
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        priority=priority,
    )


def _generate(channel: grpc.Channel, key: str | None, request: generation_pb2.GenerateRequest) -> str:
    stub = generation_pb2_grpc.GenerationStub(channel)
    metadata = _bearer(key) if key is not None else ()
    return "".join(message.text for message in stub.Generate(request, metadata=metadata, timeout=120))


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_public_grpc_answers_the_right_certificate_and_key(secure_stack: Stack, certificates) -> None:
    with grpc.secure_channel(secure_stack.public_address, _credentials(certificates.client)) as channel:
        assert len(_generate(channel, "sk-main", _request())) > 0


def test_public_grpc_refuses_a_missing_or_wrong_key(secure_stack: Stack, certificates) -> None:
    with grpc.secure_channel(secure_stack.public_address, _credentials(certificates.client)) as channel:
        for key in (None, "sk-wrong"):
            refused = _refusal(lambda key=key: _generate(channel, key, _request()))
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "sk-wrong" not in refused.details()
        # Probes need no key; reflection does.
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        list_services = reflection_pb2.ServerReflectionRequest(list_services="")
        refused = _refusal(lambda: list(reflection.ServerReflectionInfo(iter([list_services]), timeout=10)))
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = reflection.ServerReflectionInfo(
            iter([list_services]), metadata=_bearer("sk-main"), timeout=10
        )
        names = [service.name for reply in replies for service in reply.list_services_response.service]
        assert "pagedserve.v1.Generation" in names


@pytest.mark.parametrize("port", ["tokenizer", "scheduler", "worker"])
def test_every_grpc_port_refuses_a_client_without_a_certificate_from_the_ca(
    secure_stack: Stack, certificates, port: str
) -> None:
    address = {
        "tokenizer": secure_stack.public_address,
        "scheduler": secure_stack.scheduler_address,
        "worker": secure_stack.worker_address,
    }[port]
    outsiders = {
        "no client certificate": grpc.secure_channel(address, _credentials(certificates.client, False)),
        "a certificate from another CA": grpc.secure_channel(address, _credentials(certificates.stranger)),
        "plaintext": grpc.insecure_channel(address),
    }
    for what, channel in outsiders.items():
        with channel:
            refused = _refusal(lambda channel=channel: _health(channel))
            assert refused.code() == grpc.StatusCode.UNAVAILABLE, what
    with grpc.secure_channel(address, _credentials(certificates.client)) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_internal_ports_answer_a_certificate_from_the_ca(secure_stack: Stack, certificates) -> None:
    """With mTLS, the client certificate is the internal credential: no token needed."""
    credentials = _credentials(certificates.client)
    with grpc.secure_channel(secure_stack.scheduler_address, credentials) as channel:
        stats = scheduler_pb2_grpc.SchedulerStub(channel).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=10
        )
        assert stats.num_total_blocks > 0
    with grpc.secure_channel(secure_stack.worker_address, credentials) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
        assert info.num_kv_blocks > 0


def _http_client(certificates, key: str | None, present_certificate: bool = True) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(certificates.client.ca_certs))
    if present_certificate:
        context.load_cert_chain(certificates.client.certfile, certificates.client.keyfile)
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.Client(verify=context, headers=headers, timeout=120)


def _https(stack: Stack) -> str:
    return stack.http_url.replace("http://", "https://")


def _completion(model: str) -> dict:
    return {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}


def test_http_api_over_mtls_with_the_right_missing_and_wrong_key(secure_stack: Stack, certificates) -> None:
    with _http_client(certificates, "sk-main") as client:
        models = client.get(f"{_https(secure_stack)}/models")
        assert models.status_code == 200
        model = models.json()["data"][0]["id"]
        assert client.post(f"{_https(secure_stack)}/completions", json=_completion(model)).status_code == 200
    for key in (None, "sk-wrong"):
        with _http_client(certificates, key) as client:
            refused = client.get(f"{_https(secure_stack)}/models")
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
            # Probes need no key.
            assert client.get(f"{_https(secure_stack).removesuffix('/v1')}/health").status_code == 200
    with (
        _http_client(certificates, "sk-main", present_certificate=False) as client,
        pytest.raises(httpx.HTTPError),
    ):
        client.get(f"{_https(secure_stack)}/models")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{_https(secure_stack)}/models", verify=False, timeout=10)


def test_scheduler_refuses_invalid_submit_fields(secure_stack: Stack) -> None:
    """The scheduler checks what Submit receives as strictly as the public API does."""
    cases = {
        "sampling.temperature": common_pb2.SamplingParams(temperature=math.nan, max_tokens=2),
        "sampling.n": common_pb2.SamplingParams(n=200, max_tokens=2),
        "sampling.top_p": common_pb2.SamplingParams(top_p=1.5, max_tokens=2),
        "sampling.logit_bias[7]": common_pb2.SamplingParams(logit_bias={7: math.inf}, max_tokens=2),
    }
    for field, sampling in cases.items():
        request = scheduler_pb2.SubmitRequest(
            request_id=f"bad-{field}", prompt_token_ids=[1, 2, 3], sampling=sampling
        )
        refused = _refusal(lambda request=request: list(secure_stack.scheduler.Submit(request, timeout=30)))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert refused.details().startswith(field), refused.details()


def test_a_key_may_ask_only_for_priorities_in_its_range(secure_stack: Stack, certificates) -> None:
    with grpc.secure_channel(secure_stack.public_address, _credentials(certificates.client)) as channel:
        for priority in (3, 11, -(2**31)):
            refused = _refusal(
                lambda priority=priority: _generate(channel, "sk-narrow", _request(priority=priority))
            )
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "priority" in refused.details() and "[5, 10]" in refused.details()
        # In range, and 0 (no priority asked for), which becomes the range's nearest end.
        for priority in (7, 0):
            assert _generate(channel, "sk-narrow", _request(priority=priority))


def test_request_rate_limit_answers_resource_exhausted_with_retry_after(
    secure_stack: Stack, certificates
) -> None:
    with grpc.secure_channel(secure_stack.public_address, _credentials(certificates.client)) as channel:
        for _ in range(2):
            assert _generate(channel, "sk-few-requests", _request())
        stub = generation_pb2_grpc.GenerationStub(channel)
        call = stub.Generate(_request(), metadata=_bearer("sk-few-requests"), timeout=60)
        refused = _refusal(lambda: list(call))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests per minute" in refused.details() and "few-requests" in refused.details()
        retry_after = dict(call.trailing_metadata())["retry-after"]
        # Two a minute: the next one is about 30 s away.
        assert 1 <= int(retry_after) <= 31


def test_token_rate_limit_counts_generated_tokens(secure_stack: Stack, certificates) -> None:
    with grpc.secure_channel(secure_stack.public_address, _credentials(certificates.client)) as channel:
        # The prompt (6 tokens) and 2 generated ones spend more than the 5 tokens of the minute.
        assert _generate(channel, "sk-few-tokens", _request(max_tokens=2))
        refused = _refusal(lambda: _generate(channel, "sk-few-tokens", _request()))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens per minute" in refused.details()


def test_http_rate_limit_answers_429_with_retry_after(secure_stack: Stack, certificates) -> None:
    with _http_client(certificates, "sk-http-few") as client:
        model = client.get(f"{_https(secure_stack)}/models").json()["data"][0]["id"]
        assert client.post(f"{_https(secure_stack)}/completions", json=_completion(model)).status_code == 200
        refused = client.post(f"{_https(secure_stack)}/completions", json=_completion(model))
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["retry-after"]) <= 61


def test_keys_are_counted_by_name_and_appear_in_no_log_or_metric(
    secure_stack: Stack, metrics_port: int
) -> None:
    """After the tests above: every key was used, refused or not."""
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    assert 'pagedserve:api_key_requests_total{key="few-requests",outcome="rate_limited"} 1.0' in metrics
    assert 'pagedserve:api_key_requests_total{key="narrow",outcome="priority_refused"} 3.0' in metrics
    assert 'pagedserve:api_key_tokens_total{key="main"}' in metrics
    logs = "".join(path.read_text() for path in secure_stack.log_dir.glob("*.log"))
    for secret in ("sk-main", "sk-narrow", "sk-few-requests", "sk-few-tokens", "sk-http-few", "sk-wrong"):
        assert secret not in metrics and secret not in logs, secret


def _served_serial(address: str, client: TlsConfig) -> int:
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(client.ca_certs))
    context.load_cert_chain(client.certfile, client.keyfile)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as connection,
    ):
        return x509.load_der_x509_certificate(connection.getpeercert(binary_form=True)).serial_number


def test_certificates_reload_without_restart(secure_stack: Stack, certificates) -> None:
    """Last in the module: it replaces the certificate every service serves."""
    http_address = secure_stack.http_url.removeprefix("http://").removesuffix("/v1")
    addresses = [secure_stack.public_address, secure_stack.scheduler_address, secure_stack.worker_address]
    addresses.append(http_address)
    old_serial = serial_number(certificates.server.certfile)
    assert {_served_serial(address, certificates.client) for address in addresses} == {old_serial}
    # The same file names, as a rotation by a secret mount or cert-manager leaves them.
    issue(certificates.authority, certificates.server.certfile.parent, "server")
    new_serial = serial_number(certificates.server.certfile)
    deadline = time.monotonic() + 20
    for address in addresses:
        while _served_serial(address, certificates.client) != new_serial:
            assert time.monotonic() < deadline, f"{address} still serves the old certificate"
            time.sleep(0.2)
    assert all(process.poll() is None for process in secure_stack.processes.values())
    with grpc.secure_channel(secure_stack.public_address, _credentials(certificates.client)) as channel:
        assert _generate(channel, "sk-main", _request())
