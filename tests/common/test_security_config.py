"""The security settings without a stack: key files, key lookup, the per-key buckets and
priority ranges, the secrets `pagedserve serve` hands its children, TLS flag checks."""

from pathlib import Path

import pytest

from services.cli import build_parser
from services.common.api_keys import ApiKeyFileError, ApiKeys, KeyPolicy, read_key_file, short_hash
from services.common.errors import InvalidArgumentError, RateLimitedError
from services.common.tls import TlsConfig, TlsConfigError
from services.security_args import API_KEY_ENV, INTERNAL_TOKEN_ENV, service_env
from services.tokenizer.key_gate import KeyAccount, allowed_priority


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_key_file_and_policy_key_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("# team keys\nsk-one\n\n sk-two \n")
    assert [key.secret for key in read_key_file(plain)] == ["sk-one", "sk-two"]
    policies = tmp_path / "keys.toml"
    policies.write_text('[[key]]\nkey = "sk-a"\nname = "a"\npriority = [-5, 5]\ntokens_per_minute = 100\n')
    (key,) = read_key_file(policies)
    assert (key.policy.name, key.policy.min_priority, key.policy.max_priority) == ("a", -5, 5)
    assert key.policy.tokens_per_minute == 100 and key.policy.requests_per_minute is None
    # The secret stays out of every repr that a log line could show.
    assert "sk-a" not in repr(key) and "sk-one" not in repr(read_key_file(plain))


@pytest.mark.parametrize(
    "entry, field",
    [
        ('key = ""', "key[0].key"),
        ('key = "k"\npriority = [5, 1]', "key[0].priority"),
        ('key = "k"\nrequests_per_minute = 0', "key[0].requests_per_minute"),
        ('key = "k"\nrate = 3', "unknown fields"),
    ],
)
def test_key_file_errors_name_the_entry(tmp_path: Path, entry: str, field: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f"[[key]]\n{entry}\n")
    with pytest.raises(ApiKeyFileError, match=field.replace("[", r"\[").replace("]", r"\]")):
        read_key_file(path)


def test_keys_are_identified_by_their_whole_secret() -> None:
    keys = ApiKeys.load(["sk-one", "sk-two"], [])
    assert keys.identify("sk-two").name == short_hash("sk-two")
    for wrong in ("sk-tw", "sk-two ", "", "SK-TWO"):
        assert keys.identify(wrong) is None
    assert ApiKeys.load([], []) is None


def test_request_bucket_refuses_with_the_wait_and_refills() -> None:
    clock = Clock()
    account = KeyAccount(KeyPolicy("k", requests_per_minute=2), clock)
    account.admit()
    account.admit()
    with pytest.raises(RateLimitedError, match="requests per minute") as refused:
        account.admit()
    assert refused.value.retry_after_s == pytest.approx(30.0)
    clock.now = 30.0
    account.admit()


def test_token_bucket_goes_into_debt_and_holds_the_next_request() -> None:
    clock = Clock()
    policy = KeyPolicy("k", tokens_per_minute=60)
    account = KeyAccount(policy, clock)
    account.admit()
    account.charge_tokens(90)
    with pytest.raises(RateLimitedError, match="tokens per minute") as refused:
        account.admit()
    assert refused.value.retry_after_s == pytest.approx(30.0, abs=0.01)
    assert refused.value.retry_after_header == "31"
    clock.now = 31.0
    account.admit()


def test_priority_outside_the_range_is_refused_and_zero_takes_the_nearest_end() -> None:
    policy = KeyPolicy("k", min_priority=5, max_priority=10)
    assert allowed_priority(policy, 7) == 7
    assert allowed_priority(policy, 0) == 5
    for priority in (4, 11, -(2**31)):
        with pytest.raises(InvalidArgumentError, match=r"priority: must be in \[5, 10\]"):
            allowed_priority(policy, priority)


def test_serve_hands_its_children_a_new_internal_token_and_the_keys() -> None:
    args = build_parser().parse_args(["serve", "--api-key", "sk-one", "--api-key", "sk-two"])
    first, second = service_env(args, {}), service_env(args, {})
    assert len(first[INTERNAL_TOKEN_ENV]) >= 32 and first[INTERNAL_TOKEN_ENV] != second[INTERNAL_TOKEN_ENV]
    assert first[API_KEY_ENV] == "sk-one,sk-two"
    given = service_env(build_parser().parse_args(["serve"]), {INTERNAL_TOKEN_ENV: "mine"})
    assert given == {INTERNAL_TOKEN_ENV: "mine"}


def test_tls_flags_go_together(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="--ssl-keyfile"):
        TlsConfig(certfile=tmp_path / "cert.pem")
    with pytest.raises(TlsConfigError, match="--ssl-ca-certs needs"):
        TlsConfig(ca_certs=tmp_path / "ca.pem")
    assert not TlsConfig().enabled
