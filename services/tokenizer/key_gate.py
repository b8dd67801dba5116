"""Per-key policy on the public APIs: the priorities a key's requests may ask for, and its
requests and tokens per minute, as token buckets holding a minute's worth.

Priority: a request may ask for any priority in its key's range; one outside it is
refused (INVALID_ARGUMENT naming the range), except 0, which is what a request that sets
no priority sends (and all the HTTP API sends): it becomes the nearest end of the range.
Tokens are counted as each completion ends (its generated tokens, and the prompt's once),
so a long request may take the bucket below zero; the key's next request then waits until
it has refilled above zero."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, generation_pb2
from prometheus_client import CollectorRegistry, Counter

from services.common.api_keys import ApiKeys, KeyPolicy
from services.common.errors import InvalidArgumentError, RateLimitedError
from services.common.metrics import PREFIX

Clock = Callable[[], float]
Generate = Callable[[generation_pb2.GenerateRequest], AsyncIterator[generation_pb2.GenerateResponse]]


@dataclass
class TokenBucket:
    per_minute: float
    clock: Clock = time.monotonic
    level: float = field(init=False)
    _updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.per_minute
        self._updated = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.per_minute, self.level + (now - self._updated) * self.per_minute / 60.0)
        self._updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (0: it does now)."""
        self._refill()
        return max(0.0, (amount - self.level) * 60.0 / self.per_minute)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class KeyAccount:
    """One key's buckets."""

    def __init__(self, policy: KeyPolicy, clock: Clock) -> None:
        self.policy = policy
        self._requests = (
            None if policy.requests_per_minute is None else TokenBucket(policy.requests_per_minute, clock)
        )
        self._tokens = (
            None if policy.tokens_per_minute is None else TokenBucket(policy.tokens_per_minute, clock)
        )

    def admit(self) -> None:
        """Takes one request from the key's allowance; raises RateLimitedError when it has none."""
        waits = {}
        if self._requests is not None:
            waits["requests"] = self._requests.wait_s(1.0)
        if self._tokens is not None:
            # Above zero (not just at it), so that a spent bucket refuses.
            waits["tokens"] = self._tokens.wait_s(1e-9)
        spent = {what: wait for what, wait in waits.items() if wait > 0}
        if spent:
            what = " and ".join(f"{name} per minute" for name in spent)
            raise RateLimitedError(
                f"API key {self.policy.name!r} has used its {what}; retry later", max(spent.values())
            )
        if self._requests is not None:
            self._requests.take(1.0)

    def charge_tokens(self, count: int) -> None:
        if self._tokens is not None and count:
            self._tokens.take(count)


def allowed_priority(policy: KeyPolicy, priority: int) -> int:
    low, high = policy.min_priority, policy.max_priority
    if low <= priority <= high:
        return priority
    if priority == 0:
        return min(max(priority, low), high)
    raise InvalidArgumentError(
        "priority", f"must be in [{low}, {high}] for API key {policy.name!r}, got {priority}"
    )


class KeyGate:
    """What both APIs ask before and while generating for a caller."""

    def __init__(
        self, keys: ApiKeys | None, clock: Clock = time.monotonic, registry: CollectorRegistry | None = None
    ) -> None:
        self.keys = keys
        self._clock = clock
        self._accounts: dict[str, KeyAccount] = {}
        # By the key's name (a short hash unless the key file names it), never the key.
        self._requests = Counter(
            PREFIX + "api_key_requests",
            "Generate requests by API key name and outcome (admitted, rate_limited, priority_refused).",
            ["key", "outcome"],
            registry=registry,
        )
        self._tokens = Counter(
            PREFIX + "api_key_tokens",
            "Prompt and generated tokens by API key name.",
            ["key"],
            registry=registry,
        )

    def caller(self, token: str | None) -> KeyPolicy | None:
        """The policy of the key `token` is; None when the API needs no key (or the token is
        no key, which the API refused already)."""
        if self.keys is None or token is None:
            return None
        return self.keys.identify(token)

    def _account(self, policy: KeyPolicy) -> KeyAccount:
        account = self._accounts.get(policy.name)
        if account is None:
            account = self._accounts[policy.name] = KeyAccount(policy, self._clock)
        return account

    async def generate(
        self, caller: KeyPolicy | None, request: generation_pb2.GenerateRequest, generate: Generate
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        if caller is None:
            async with _closing(generate(request)) as messages:
                async for message in messages:
                    yield message
            return
        try:
            priority = allowed_priority(caller, request.priority)
        except InvalidArgumentError:
            self._requests.labels(caller.name, "priority_refused").inc()
            raise
        account = self._account(caller)
        try:
            account.admit()
        except RateLimitedError:
            self._requests.labels(caller.name, "rate_limited").inc()
            raise
        self._requests.labels(caller.name, "admitted").inc()
        if priority != request.priority:
            adjusted = generation_pb2.GenerateRequest()
            adjusted.CopyFrom(request)
            adjusted.priority = priority
            request = adjusted
        prompt_counted = False
        # Closed with this generator, so that a caller who leaves early aborts the request.
        async with _closing(generate(request)) as messages:
            async for message in messages:
                # Each completion's last message carries its usage; the prompt counts once.
                if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    tokens = message.usage.completion_tokens
                    if not prompt_counted:
                        tokens += message.usage.prompt_tokens
                        prompt_counted = True
                    account.charge_tokens(tokens)
                    self._tokens.labels(caller.name).inc(tokens)
                yield message


@asynccontextmanager
async def _closing(
    messages: AsyncIterator[generation_pb2.GenerateResponse],
) -> AsyncIterator[AsyncIterator[generation_pb2.GenerateResponse]]:
    """Closes the stream on the way out when it can be closed (a generator), so that a
    caller who leaves early aborts its request at once."""
    try:
        yield messages
    finally:
        close = getattr(messages, "aclose", None)
        if close is not None:
            await close()
