"""The online serving benchmark end to end on CPU with the embedded model and a tiny load:
both APIs, a finite rate and all at once; every request completes with exactly its
output length, and the summary's numbers agree with each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.pretend_device import PretendCosts
from benchmarks.serving import arrival_offsets
from benchmarks.serving_datasets import DatasetSpec, build_dataset, for_run
from benchmarks.serving_metrics import RequestRecord, Slo, summarize
from tests.benchmarks.test_benchmark_smoke import run_benchmark

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 4, 16, 4


def test_arrivals_follow_the_rate_and_burstiness() -> None:
    poisson = arrival_offsets(4000, 20.0, 1.0, seed=0)
    bursty = arrival_offsets(4000, 20.0, 0.25, seed=0)
    assert poisson == sorted(poisson) and poisson[0] == 0.0
    # The mean gap is 1 / rate either way; burstier gaps vary more.
    assert poisson[-1] / 3999 == pytest.approx(0.05, rel=0.05)
    assert bursty[-1] / 3999 == pytest.approx(0.05, rel=0.1)
    gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    poisson_gaps = [b - a for a, b in zip(poisson, poisson[1:])]
    assert max(gaps) > 2 * max(poisson_gaps)
    assert arrival_offsets(3, float("inf"), 1.0, seed=0) == [0.0, 0.0, 0.0]


def test_datasets_draw_their_lengths() -> None:
    ranged = build_dataset(DatasetSpec("random", 200, input_len=100, output_len=50, range_ratio=0.5))
    assert {len(r.prompt_token_ids) for r in ranged} <= set(range(50, 151))
    assert {r.output_len for r in ranged} <= set(range(25, 76))
    assert len({len(r.prompt_token_ids) for r in ranged}) > 20
    shared = build_dataset(DatasetSpec("shared-prefix", 12, input_len=8, num_prefixes=2, prefix_len=32))
    assert len({tuple(r.prompt_token_ids[:32]) for r in shared}) == 2
    short = build_dataset(DatasetSpec("short", 50))
    # Each run renames the ids: lengths and shared prefixes stay, nothing else is shared.
    first, second = for_run(shared, 1), for_run(shared, 2)
    assert [len(r.prompt_token_ids) for r in first] == [len(r.prompt_token_ids) for r in shared]
    assert len({tuple(r.prompt_token_ids[:32]) for r in first}) == 2
    assert not {tuple(r.prompt_token_ids[:16]) for r in first} & {
        tuple(r.prompt_token_ids[:16]) for r in second
    }
    assert all(20 <= len(r.prompt_token_ids) <= 200 and 20 <= r.output_len <= 200 for r in short)


@pytest.mark.e2e
def test_serving_sweep_on_both_apis(tmp_path: Path) -> None:
    summary, printed = run_benchmark(
        "serving",
        "--serve",
        "--api",
        "grpc,http",
        "--dataset",
        "random",
        "--num-prompts",
        str(NUM_PROMPTS),
        "--input-len",
        str(INPUT_LEN),
        "--output-len",
        str(OUTPUT_LEN),
        "--request-rates",
        "16,inf",
        "--warmup",
        "1",
        # Two client processes: their records merge into each rate's one run.
        "--client-processes",
        "2",
        "--slo-ttft-ms",
        "1e9",
        "--plot",
        str(tmp_path / "serving.png"),
        out=tmp_path / "serving.json",
    )
    results = summary["results"]
    assert [(r["api"], r["request_rate"]) for r in results] == [
        ("grpc", 16.0),
        ("grpc", float("inf")),
        ("http", 16.0),
        ("http", float("inf")),
    ]
    for result in results:
        assert (result["completed"], result["failed"]) == (NUM_PROMPTS, 0), result
        assert result["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        assert result["output_throughput"] == pytest.approx(result["output_tokens"] / result["duration_s"])
        # Every request met an SLO this loose.
        assert result["goodput"] == pytest.approx(result["request_throughput"])
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            stats = result[metric]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (metric, stats)
        assert result["ttft_ms"]["p50"] <= result["e2el_ms"]["p50"]
        assert result["tokens_per_message"] >= 1
    assert printed.count("rate") == 4
    assert (tmp_path / "serving.png").stat().st_size > 1000


def test_pretend_costs_read_back_and_price_mixed_steps() -> None:
    costs = PretendCosts.parse("step_base_ms=2,step-us-per-prompt-token=10")
    assert costs == PretendCosts(step_base_ms=2.0, step_us_per_prompt_token=10.0)
    assert PretendCosts.parse(costs.text()) == costs
    # Decoding sequences and prompt tokens of one step both add to its time.
    decode_only = costs.step_seconds(num_decodes=4, num_prompt_tokens=0)
    mixed = costs.step_seconds(num_decodes=4, num_prompt_tokens=100)
    assert mixed - decode_only == pytest.approx(100 * 10e-6)
    assert costs.step_seconds(0, 0) == 0.0


@pytest.mark.e2e
def test_serving_in_front_of_a_pretend_device(tmp_path: Path) -> None:
    """--pretend-device puts benchmarks/pretend_device.py's worker in the real one's place:
    every request still completes with its output length. The scheduler's own count of the
    gaps between tokens, read from its /metrics around the rate, matches the client's; every
    service's garbage collector pauses are read the same way."""
    summary, _ = run_benchmark(
        "serving",
        "--serve",
        "--pretend-device",
        "step_base_ms=0.5",
        *("--dataset", "random", "--num-prompts", str(NUM_PROMPTS)),
        *("--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN)),
        *("--request-rates", "inf", "--warmup", "0"),
        out=tmp_path / "serving.json",
    )
    [result] = summary["results"]
    assert (result["completed"], result["failed"]) == (NUM_PROMPTS, 0), result
    assert result["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    shares = result["gap_shares"]
    num_gaps = NUM_PROMPTS * (OUTPUT_LEN - 1)
    assert shares["scheduler itl"]["count"] == shares["client"]["count"] == num_gaps, shares
    assert shares["scheduler step"]["count"] >= OUTPUT_LEN, shares
    assert all(
        0.0 <= share <= 1.0 for row in shares.values() for name, share in row.items() if name != "count"
    )
    # Each service's garbage collector pauses over the rate, by generation (a run this
    # short may see none: objects freed as they go leave the collector little to do).
    pauses = result["gc_pauses"]
    assert set(pauses) == {"scheduler", "tokenizer", "worker"}, pauses
    rows = [row for by_generation in pauses.values() for row in by_generation.values()]
    assert all(0 <= row["> 5 ms"] <= row["count"] and row["seconds"] >= 0 for row in rows), pauses


def test_merged_tokens_show_as_tokens_per_message_and_one_gap() -> None:
    # Four tokens in three messages (two merged 20 ms after the first), two in two.
    merged = RequestRecord(prompt_len=8, sent_at=0.0, token_times=[0.010, 0.030, 0.035], output_tokens=4)
    plain = RequestRecord(prompt_len=8, sent_at=0.0, token_times=[0.010, 0.015], output_tokens=2)
    summary = summarize([merged, plain], duration_s=1.0, slo=Slo())
    assert summary["tokens_per_message"] == pytest.approx(6 / 5)
    # The merged message is one gap of 20 ms, not two of 10.
    assert summary["itl_ms"]["p99"] == pytest.approx(20.0)
    assert summary["itl_ms"]["mean"] == pytest.approx((20 + 5 + 5) / 3)


def test_gc_pauses_read_from_a_services_metrics() -> None:
    """A service's /metrics (services/common/gc_pauses.py's histogram) read back by
    generation: the count, the seconds and how many pauses lasted over 5 ms, and the
    difference between two readings."""
    from prometheus_client import CollectorRegistry

    from benchmarks.serving_server_side import gc_pauses_between, read_gc_pauses
    from services.common.gc_pauses import GcPauses
    from services.common.metrics import serve_metrics
    from services.launcher import free_port

    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    port = free_port()
    serve_metrics(registry, port, "127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    pauses.histogram.labels("1").observe(0.0002)
    before = read_gc_pauses(url)
    for seconds in (0.001, 0.003, 0.007, 0.02):
        pauses.histogram.labels("2").observe(seconds)
    after = read_gc_pauses(url)
    assert before == {"1": {"count": 1.0, "seconds": pytest.approx(0.0002), "> 5 ms": 0.0}}
    assert gc_pauses_between(before, after) == {
        "1": {"count": 0.0, "seconds": 0.0, "> 5 ms": 0.0},
        "2": {"count": 4.0, "seconds": pytest.approx(0.031), "> 5 ms": 2.0},
    }
