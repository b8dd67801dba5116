"""The public API's keys and what each may do.

A key file holds either one key per line (blank lines and `#` comments skipped), each
with the default policy, or TOML tables when any line is `[[key]]`:

    [[key]]
    key = "sk-team-a-..."
    name = "team-a"                # in logs and metrics instead of the key
    priority = [0, 100]            # the priorities its requests may ask for
    requests_per_minute = 600
    tokens_per_minute = 200000     # prompt and generated tokens together

A key's secret is never logged, traced or counted: everything names it by `name`, which
defaults to a short hash of the key."""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

INT32_MAX = 2**31 - 1

# Plain keys may not jump the queue: priority 0 (the default) is the best they get.
DEFAULT_PRIORITY_RANGE = (0, INT32_MAX)

_POLICY_FIELDS = {"key", "name", "priority", "requests_per_minute", "tokens_per_minute"}


class ApiKeyFileError(ValueError):
    """A key file that cannot be read; the message names the file and the entry."""


@dataclass(frozen=True)
class KeyPolicy:
    name: str
    # Lowest and highest priority the key's requests may ask for (lower runs first).
    min_priority: int = DEFAULT_PRIORITY_RANGE[0]
    max_priority: int = DEFAULT_PRIORITY_RANGE[1]
    # None: no limit.
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


@dataclass(frozen=True)
class ApiKey:
    secret: str = field(repr=False)
    policy: KeyPolicy

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.secret.encode()).digest()


def short_hash(secret: str) -> str:
    """A name for a key that reveals nothing usable about it."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def plain_key(secret: str) -> ApiKey:
    return ApiKey(secret, KeyPolicy(name=short_hash(secret)))


class ApiKeys:
    """Looks a presented key up in time that does not depend on how much of it matched,
    nor on which key it matched."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = [(key.digest, key.policy) for key in keys]
        if not self._keys:
            raise ValueError("ApiKeys needs at least one key")

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, presented: str) -> KeyPolicy | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found: KeyPolicy | None = None
        for key_digest, policy in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = policy
        return found

    @classmethod
    def load(cls, plain: Sequence[str], files: Sequence[Path]) -> ApiKeys | None:
        """The keys given on the command line (`plain`) and in `files`; None when there are
        none, meaning the API is open."""
        keys = [plain_key(secret) for secret in plain if secret]
        for path in files:
            keys += read_key_file(path)
        return cls(keys) if keys else None


def read_key_file(path: Path) -> list[ApiKey]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ApiKeyFileError(f"{path}: {error.strerror}") from error
    lines = [line.strip() for line in text.splitlines()]
    if "[[key]]" not in lines:
        return [plain_key(line) for line in lines if line and not line.startswith("#")]
    try:
        tables = tomllib.loads(text).get("key", [])
    except tomllib.TOMLDecodeError as error:
        raise ApiKeyFileError(f"{path}: {error}") from error
    return [_policy_key(path, index, table) for index, table in enumerate(tables)]


def _policy_key(path: Path, index: int, table: dict[str, object]) -> ApiKey:
    where = f"{path}: key[{index}]"
    unknown = sorted(set(table) - _POLICY_FIELDS)
    if unknown:
        raise ApiKeyFileError(f"{where}: unknown fields {unknown}; allowed: {sorted(_POLICY_FIELDS)}")
    secret = table.get("key")
    if not isinstance(secret, str) or not secret:
        raise ApiKeyFileError(f"{where}.key: must be a non-empty string")
    name = table.get("name", short_hash(secret))
    if not isinstance(name, str) or not name:
        raise ApiKeyFileError(f"{where}.name: must be a non-empty string")
    priority = table.get("priority", list(DEFAULT_PRIORITY_RANGE))
    low, high = priority if isinstance(priority, list) and len(priority) == 2 else (None, None)
    if not (isinstance(low, int) and isinstance(high, int) and -(2**31) <= low <= high <= INT32_MAX):
        raise ApiKeyFileError(f"{where}.priority: must be [low, high], int32 with low <= high")
    rates = {}
    for rate in ("requests_per_minute", "tokens_per_minute"):
        value = table.get(rate)
        if value is not None and (not isinstance(value, int | float) or value <= 0):
            raise ApiKeyFileError(f"{where}.{rate}: must be a positive number, got {value!r}")
        rates[rate] = None if value is None else float(value)
    return ApiKey(secret, KeyPolicy(name, low, high, **rates))
