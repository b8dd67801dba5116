"""The benchmarks' engine settings reach the services a gRPC run starts (and so the
in-process run too, whose worker is built from the same command line)."""

from pathlib import Path

from benchmarks.engine_settings import EngineSettings
from benchmarks.pagedserve_runs import serve_commands
from services.cli import build_parser
from services.scheduler.config import SchedulerConfig


def _parsed(settings: EngineSettings) -> dict:
    commands = serve_commands(Path("/models/m"), settings, {"worker": 1, "scheduler": 2, "tokenizer": 3})
    parser = build_parser()
    return {
        name: parser.parse_args(commands[name][commands[name].index(name) :])
        for name in ("worker", "scheduler")
    }


def test_each_setting_reaches_its_service() -> None:
    parsed = _parsed(
        EngineSettings(
            device="cpu",
            prefill_graphs=False,
            max_prompt_tokens_with_decodes=64,
            prompt_tokens_per_decode=4,
            admission_batch_tokens=0,
        )
    )
    assert parsed["worker"].prefill_graphs is False
    assert parsed["scheduler"].max_prompt_tokens_with_decodes == 64
    assert parsed["scheduler"].prompt_tokens_per_decode == 4
    assert parsed["scheduler"].admission_batch_tokens == 0


def test_defaults_are_the_services_own() -> None:
    parsed = _parsed(EngineSettings(device="cpu"))
    assert parsed["worker"].prefill_graphs is True
    assert (
        parsed["scheduler"].max_prompt_tokens_with_decodes == SchedulerConfig.max_prompt_tokens_with_decodes
    )
    assert parsed["scheduler"].prompt_tokens_per_decode == SchedulerConfig.prompt_tokens_per_decode


def test_several_tokenizers_share_the_public_port() -> None:
    ports = {"worker": 1, "scheduler": 2, "tokenizer": 3}
    commands = serve_commands(Path("/models/m"), EngineSettings(device="cpu", tokenizers=2), ports)
    tokenizers = [name for name in commands if name.startswith("tokenizer")]
    assert len(tokenizers) == 2
    assert all("--reuse-port" in commands[name] for name in tokenizers)
    assert {ports[name] for name in tokenizers} == {3}
