"""TLS without client certificates, an internal token between the services and an API key
from the environment, against one real stack: the public port wants the key, the
scheduler and the worker want the token (nobody outside can hold the worker's step
stream, abort requests or read stats), health is open everywhere. The services trust
the test CA through gRPC's own roots variable, as a deployment with a private CA and no
mTLS would."""

import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
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
from tests.support.certificates import issue, make_authority
from tests.support.service_stack import Stack, service_stack

API_KEY = "sk-from-the-environment"
INTERNAL_TOKEN = "internal-token-of-this-test"


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory) -> TlsConfig:
    directory = tmp_path_factory.mktemp("certificates")
    return issue(make_authority(directory / "ca"), directory / "server", "server")


@pytest.fixture(scope="module")
def token_stack(embedded_model_dir: Path, tmp_path_factory, server_tls: TlsConfig) -> Stack:
    env = {
        "PAGEDSERVE_API_KEY": API_KEY,
        "PAGEDSERVE_INTERNAL_TOKEN": INTERNAL_TOKEN,
        # The services' client side trusts the test CA: gRPC's default roots.
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(server_tls.ca_certs),
    }
    with service_stack(
        embedded_model_dir,
        tmp_path_factory.mktemp("token-stack"),
        serve_flags=["--ssl-certfile", str(server_tls.certfile), "--ssl-keyfile", str(server_tls.keyfile)],
        env=env,
        http_api=True,
        tls=server_tls,
    ) as running:
        yield running


def _tls_channel(address: str, tls: TlsConfig) -> grpc.Channel:
    return grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=tls.ca_certs.read_bytes())
    )


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _health(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_public_port_serves_tls_and_wants_the_key(
    token_stack: Stack, server_tls: TlsConfig, tmp_path
) -> None:
    request = generation_pb2.GenerateRequest(
        prompt="Hello", sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1)
    )
    with _tls_channel(token_stack.public_address, server_tls) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        assert _code(lambda: list(stub.Generate(request, metadata=_bearer(API_KEY), timeout=120))) == (
            grpc.StatusCode.OK
        )
        for key in (None, "sk-wrong", INTERNAL_TOKEN):
            code = _code(lambda key=key: list(stub.Generate(request, metadata=_bearer(key), timeout=30)))
            assert code == grpc.StatusCode.UNAUTHENTICATED, key
        _health(channel)
    # A client that does not trust the server's CA, and one that speaks plaintext.
    other = issue(make_authority(tmp_path / "other-ca"), tmp_path / "other", "other")
    for channel in (
        _tls_channel(token_stack.public_address, other),
        grpc.insecure_channel(token_stack.public_address),
    ):
        with channel:
            assert _code(lambda channel=channel: _health(channel)) == grpc.StatusCode.UNAVAILABLE


def test_http_api_serves_tls_and_wants_the_key(token_stack: Stack, server_tls: TlsConfig) -> None:
    url = token_stack.http_url.replace("http://", "https://")
    verify = ssl.create_default_context(cafile=str(server_tls.ca_certs))
    assert (
        httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"}, verify=verify).status_code
        == 200
    )
    for key in ("sk-wrong", INTERNAL_TOKEN):
        assert (
            httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, verify=verify).status_code
            == 401
        )
    assert httpx.get(f"{url}/models", verify=verify).status_code == 401
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{token_stack.http_url}/models", timeout=10)


def test_scheduler_answers_only_the_internal_token(token_stack: Stack, server_tls: TlsConfig) -> None:
    with _tls_channel(token_stack.scheduler_address, server_tls) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for token in (None, "wrong-token", API_KEY):
            calls = {
                "GetStats": lambda token=token: stub.GetStats(
                    scheduler_pb2.GetStatsRequest(), metadata=_bearer(token)
                ),
                "Abort": lambda token=token: stub.Abort(
                    scheduler_pb2.AbortRequest(request_id="someone-else"), metadata=_bearer(token)
                ),
                "Submit": lambda token=token: list(
                    stub.Submit(
                        scheduler_pb2.SubmitRequest(request_id="x", prompt_token_ids=[1, 2]),
                        metadata=_bearer(token),
                        timeout=30,
                    )
                ),
            }
            for name, call in calls.items():
                assert _code(call) == grpc.StatusCode.UNAUTHENTICATED, (name, token)
        stats = stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=_bearer(INTERNAL_TOKEN), timeout=10)
        assert stats.num_total_blocks > 0
        _health(channel)


def test_worker_answers_only_the_internal_token(token_stack: Stack, server_tls: TlsConfig) -> None:
    """Without the token nobody can take the worker's step stream from its scheduler."""
    with _tls_channel(token_stack.worker_address, server_tls) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for token in (None, "wrong-token", API_KEY):
            assert _code(
                lambda token=token: stub.Describe(worker_pb2.DescribeRequest(), metadata=_bearer(token))
            ) == (grpc.StatusCode.UNAUTHENTICATED)
            steps = stub.Steps(iter([]), metadata=_bearer(token), timeout=10)
            assert _code(lambda steps=steps: list(steps)) == grpc.StatusCode.UNAUTHENTICATED
        info = stub.Describe(worker_pb2.DescribeRequest(), metadata=_bearer(INTERNAL_TOKEN), timeout=10)
        assert info.num_kv_blocks > 0
        _health(channel)
    # The stack still serves: its scheduler kept its step stream.
    with _tls_channel(token_stack.public_address, server_tls) as channel:
        request = generation_pb2.GenerateRequest(
            prompt="Hi", sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1)
        )
        messages = list(
            generation_pb2_grpc.GenerationStub(channel).Generate(request, metadata=_bearer(API_KEY))
        )
        assert messages[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def test_no_secret_reaches_the_logs(token_stack: Stack) -> None:
    logs = "".join(path.read_text() for path in token_stack.log_dir.glob("*.log"))
    assert API_KEY not in logs and INTERNAL_TOKEN not in logs
    assert "sk-wrong" not in logs
