"""The model's generation_config.json fills the sampling fields a request leaves unset,
and only those."""

import json
from pathlib import Path

import pytest
from pagedserve.v1 import generation_pb2

from services.tokenizer.frontend import FrontendConfig, RequestFrontend
from services.tokenizer.sampling_defaults import describe, read_sampling_defaults
from services.tokenizer.tokenizer import TextTokenizer
from tests.support.small_tokenizer import write_model_dir

MODEL_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "repetition_penalty": 1.1,
    "eos_token_id": 2,
}


def _frontend(model_dir: Path) -> RequestFrontend:
    tokenizer = TextTokenizer.from_model_dir(model_dir)
    defaults = read_sampling_defaults(model_dir, tokenizer.vocab_size)
    config = FrontendConfig(max_model_len=64, vocab_size=tokenizer.vocab_size, sampling_defaults=defaults)
    return RequestFrontend(tokenizer, config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_model_dir(tmp_path_factory.mktemp("model"))
    (path / "generation_config.json").write_text(json.dumps(MODEL_DEFAULTS))
    return path


def test_unset_fields_take_the_models_defaults(model_dir: Path) -> None:
    prepared = _frontend(model_dir).prepare_generate(generation_pb2.GenerateRequest(prompt="Hello"))
    sampling = prepared.sampling
    assert sampling.temperature == pytest.approx(0.6) and sampling.top_p == pytest.approx(0.9)
    assert sampling.top_k == 20 and sampling.repetition_penalty == pytest.approx(1.1)
    assert not sampling.HasField("min_p")
    assert describe(read_sampling_defaults(model_dir, 300)) == (
        "temperature=0.6 top_p=0.9 top_k=20 repetition_penalty=1.1"
    )


def test_what_the_request_sets_wins(model_dir: Path) -> None:
    request = generation_pb2.GenerateRequest(
        prompt="Hello", sampling={"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
    )
    sampling = _frontend(model_dir).prepare_generate(request).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0, 1.0, -1)
    assert sampling.repetition_penalty == 1.0


def test_no_generation_config_means_no_defaults(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model")
    sampling = _frontend(model_dir).prepare_generate(generation_pb2.GenerateRequest(prompt="Hi")).sampling
    assert not sampling.HasField("temperature") and sampling.top_k == 0


def test_a_default_out_of_range_is_refused_naming_file_and_field(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model")
    (model_dir / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match=r"generation_config\.json.*sampling\.top_p.*\(0, 1\]"):
        read_sampling_defaults(model_dir, 300)
