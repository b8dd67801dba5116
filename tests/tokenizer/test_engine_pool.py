"""The addresses a tokenizer's engine targets stand for."""

import asyncio

from services.tokenizer.engine_pool import resolve


def test_a_fixed_address_stands_for_itself():
    assert asyncio.run(resolve("scheduler-0.example:50052")) == ["scheduler-0.example:50052"]


def test_a_dns_target_stands_for_every_address_of_its_name():
    addresses = asyncio.run(resolve("dns:///localhost:50052"))
    assert "127.0.0.1:50052" in addresses
    assert all(address.endswith(":50052") for address in addresses)


def test_a_name_that_does_not_resolve_stands_for_no_engine():
    assert asyncio.run(resolve("dns:///no-such-engine.invalid:50052")) == []
