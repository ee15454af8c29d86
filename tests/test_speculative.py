"""Speculative decoding, kiln's side: the configuration (vLLM's speculative_config and LMI's draft-model names,
validated with the fix named), draft models (packaged by the build as draft/, refused for another tokenizer), the
artifact's recorded config, and the acceptance metrics on /metrics (the fake engine counts what n-gram prompt
lookup drafts and accepts). tests/test_speculative_vllm.py runs it on vLLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import build, configure_with_fake, fake_server, run_cli

pytestmark = pytest.mark.unit

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def _problems(model: Path | str, options: list[str], env: dict[str, str] | None = None, **cli: Any) -> str:
    from runtime.config import ConfigError

    with pytest.raises(ConfigError) as err:
        configure_with_fake(model, options, env, **cli)
    return str(err.value)


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer has 512 tokens: it cannot draft for the 1024-token tiny model."""
    uri = build("model.name=tiny-512", "model.synth.vocab_size=512", "model.synth.num_hidden_layers=1")
    d = tmp_path_factory.mktemp("other-tok") / "m"
    assert run_cli("artifacts", "pull", uri, str(d)).returncode == 0
    return d


# -- configuration ---------------------------------------------------------------------------------------------------


def test_an_ngram_config_from_the_environment_reaches_the_engine(tiny_dir: Path) -> None:
    startup = configure_with_fake(tiny_dir, [], {"OPTION_SPECULATIVE_CONFIG": json.dumps(NGRAM)}, engine="fake")
    sp = startup.plan.settings.speculative
    assert (sp.method, sp.num_speculative_tokens, sp.draft) == ("ngram", 3, None)
    assert dict(sp.options) == {"prompt_lookup_max": 3, "prompt_lookup_min": 1}
    assert str(startup.resolved.origin("speculative_config")) == "env OPTION_SPECULATIVE_CONFIG"


def test_vllm_gets_the_config_with_the_draft_as_a_local_directory(draft_spec_uri: str) -> None:
    startup = configure_with_fake(draft_spec_uri, [])
    args = startup.plan.spec.native_args(startup.plan.settings)
    conf = args["speculative_config"]
    assert conf["method"] == "draft_model"
    assert conf["num_speculative_tokens"] == 2
    # The artifact recorded "draft"; the engine gets the verified folder inside the pulled artifact.
    assert Path(conf["model"]) == startup.model.path / "draft"
    assert (Path(conf["model"]) / "model.safetensors").is_file()


def test_lmi_draft_model_names_make_a_draft_model_config(tiny_uri: str, draft_dir: Path) -> None:
    options = [f"speculative_draft_model={draft_dir}", "speculative_length=5", "draft_model_tp_size=1"]
    sp = configure_with_fake(tiny_uri, options).plan.settings.speculative
    assert (sp.method, sp.num_speculative_tokens, sp.draft) == ("draft_model", 5, draft_dir.resolve())
    assert dict(sp.options) == {"draft_tensor_parallel_size": 1}
    # LMI's default length when only the draft is named
    assert (
        configure_with_fake(
            tiny_uri, [f"speculative_draft_model={draft_dir}"]
        ).plan.settings.speculative.num_speculative_tokens
        == 4
    )


def test_an_operator_config_overrides_the_artifacts(draft_spec_uri: str) -> None:
    sp = configure_with_fake(draft_spec_uri, [f"speculative_config={json.dumps(NGRAM)}"]).plan.settings.speculative
    assert (sp.method, sp.draft) == ("ngram", None)
    # LMI's length alone adjusts the recorded draft-model config
    sp = configure_with_fake(draft_spec_uri, ["speculative_length=3"]).plan.settings.speculative
    assert (sp.method, sp.num_speculative_tokens) == ("draft_model", 3)


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"model": "DRAFT", "num_speculative_tokens": 3}, '"method": "draft_model"'),
        ({"num_speculative_tokens": 3}, 'needs "method": one of ngram, draft_model'),
        ({"method": "medusa2", "num_speculative_tokens": 3}, "unknown method 'medusa2'; known: ngram"),
        ({"method": "ngram"}, '"num_speculative_tokens" must be a whole number >= 1'),
        ({"method": "ngram", "num_speculative_tokens": 0}, '"num_speculative_tokens" must be a whole number >= 1'),
        ({**NGRAM, "prompt_lookup_min": 4}, '"prompt_lookup_min" (4) must not exceed "prompt_lookup_max" (3)'),
        ({**NGRAM, "prompt_lookup_max": "x"}, '"prompt_lookup_max" must be a whole number >= 1'),
        ({"method": "draft_model", "num_speculative_tokens": 3}, 'needs "model", the draft checkpoint'),
        ({**NGRAM, "tensor_parallel_size": 2}, 'use "draft_tensor_parallel_size"'),
        ({**NGRAM, "lookahead": 2}, "unknown key(s) ['lookahead'] for the vllm engine"),
    ],
)
def test_a_bad_config_is_refused_naming_the_fix(
    tiny_uri: str, draft_dir: Path, config: dict[str, Any], says: str
) -> None:
    text = json.dumps(config).replace("DRAFT", str(draft_dir))
    message = _problems(tiny_uri, [], {"OPTION_SPECULATIVE_CONFIG": text})
    assert "env OPTION_SPECULATIVE_CONFIG" in message
    assert says in message, message


def test_text_that_is_not_a_json_object_is_refused(tiny_uri: str) -> None:
    assert "not valid JSON" in _problems(tiny_uri, ["speculative_config={method: ngram}"])
    assert "expected a JSON object" in _problems(tiny_uri, ["speculative_config=[1, 2]"])


def test_both_spellings_from_the_operator_are_a_conflict(tiny_uri: str, draft_dir: Path) -> None:
    message = _problems(tiny_uri, [f"speculative_config={json.dumps(NGRAM)}", f"speculative_draft_model={draft_dir}"])
    assert "both configure speculative decoding; keep one" in message
    assert "speculative_length" in _problems(tiny_uri, ["speculative_length=3"])


def test_an_engine_that_does_not_speculate_is_refused_naming_those_that_do(tiny_hf_uri: str, tiny_dir: Path) -> None:
    message = _problems(tiny_hf_uri, [f"speculative_config={json.dumps(NGRAM)}"])
    assert "the transformers engine does not run ngram speculative decoding; engines that do: vllm" in message
    draft = {"method": "draft_model", "model": str(tiny_dir), "num_speculative_tokens": 2}
    message = _problems(tiny_dir, [f"speculative_config={json.dumps(draft)}"], engine="fake")
    assert "the fake engine does not run draft_model" in message


def test_an_embedding_model_does_not_speculate(minilm_uri: str) -> None:
    message = _problems(minilm_uri, [f"speculative_config={json.dumps(NGRAM)}"])
    assert "speculative decoding is for text generation, and this model is for task=embed" in message


def test_a_draft_with_another_tokenizer_is_refused_at_start(tiny_uri: str, other_tokenizer_dir: Path) -> None:
    message = _problems(tiny_uri, [f"speculative_draft_model={other_tokenizer_dir}"])
    assert f"draft model '{other_tokenizer_dir}'" in message
    assert "the draft's vocab_size is 512 and the target's 1024" in message
    assert "a draft model must use the model's tokenizer" in message


def test_a_missing_or_damaged_draft_is_refused(tiny_uri: str, draft_dir: Path, tmp_path: Path) -> None:
    assert "no such directory" in _problems(tiny_uri, [f"speculative_draft_model={tmp_path / 'none'}"])
    damaged = tmp_path / "draft"
    shutil.copytree(draft_dir, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:  # truncated: the manifest's size and digest disagree
        f.truncate(1000)
    message = _problems(tiny_uri, [f"speculative_draft_model={damaged}"])
    assert f"draft model '{damaged}'" in message
    assert "model.safetensors" in message, message


def test_runtime_config_shows_the_speculation(draft_spec_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.__main__ import print_config

    startup = configure_with_fake(draft_spec_uri, [])
    print_config(startup, True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["speculative"]["method"] == "draft_model"
    assert doc["settings"]["speculative_config"]["source"] == "artifact serving.speculative_config"
    print_config(startup, False)
    assert "speculative draft_model x2)" in capsys.readouterr().out.splitlines()[-1]


# -- the tokenizer check both halves share --------------------------------------------------------------------------


def test_the_tokenizer_check_compares_ids_not_file_bytes(draft_dir: Path, tiny_dir: Path, tmp_path: Path) -> None:
    from artifacts.tokenizers import tokenizer_mismatch

    assert tokenizer_mismatch(tiny_dir, draft_dir) is None
    edited = tmp_path / "edited"
    shutil.copytree(draft_dir, edited)
    tok = json.loads((edited / "tokenizer.json").read_text())
    tok["truncation"] = {"max_length": 8, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    (edited / "tokenizer.json").write_text(json.dumps(tok))
    assert tokenizer_mismatch(tiny_dir, edited) is None  # truncation does not change what an id means
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[500:502]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (edited / "tokenizer.json").write_text(json.dumps(tok))
    why = tokenizer_mismatch(tiny_dir, edited)
    assert why is not None
    assert why.startswith("the tokenizers differ (vocab: 2 entries differ"), why


# -- metrics ---------------------------------------------------------------------------------------------------------


def _series(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    assert lines, f"{name} not in /metrics"
    return float(lines[0].split()[1])


def test_metrics_export_drafted_and_accepted_tokens(tiny_dir: Path) -> None:
    with fake_server(tiny_dir, f"speculative_config={json.dumps(NGRAM)}") as srv:
        before = httpx.get(srv.base + "/metrics").text
        assert _series(before, "kiln_spec_decode_drafts_total") == 0
        assert _series(before, "kiln_spec_decode_acceptance_ratio") == 0
        # [utf8] outputs cycle through a few byte tokens: prompt lookup drafts them and most are accepted
        body = {"model": "tiny-llama", "prompt": "[utf8]", "max_tokens": 40, "temperature": 0}
        assert httpx.post(srv.base + "/v1/completions", json=body).status_code == 200
        text = httpx.get(srv.base + "/metrics").text
    drafts, drafted = (
        _series(text, "kiln_spec_decode_drafts_total"),
        _series(text, "kiln_spec_decode_draft_tokens_total"),
    )
    accepted = _series(text, "kiln_spec_decode_accepted_tokens_total")
    assert 0 < accepted <= drafted <= 3 * drafts
    assert _series(text, "kiln_spec_decode_acceptance_ratio") == pytest.approx(accepted / drafted)
    assert _series(text, "kiln_spec_decode_mean_acceptance_length") == pytest.approx(1 + accepted / drafts)
    assert accepted / drafted > 0.5
    # steps: each draft yields its accepted tokens plus the verified one; 40 tokens in fewer steps than tokens
    assert drafts < 40


def test_no_speculation_no_speculation_series(tiny_dir: Path) -> None:
    with fake_server(tiny_dir) as srv:
        assert "kiln_spec_decode" not in httpx.get(srv.base + "/metrics").text


# -- the build --------------------------------------------------------------------------------------------------------


def _manifest(uri: str) -> dict[str, Any]:
    proc = run_cli("artifacts", "show", uri)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout)["manifest"])


def test_an_ngram_build_records_its_config() -> None:
    m = _manifest(build("speculative=ngram", "speculative.num_speculative_tokens=3", "model.name=tiny-ngram"))
    assert m["serving"]["speculative_config"] == {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 4,
    }
    assert not any(f["path"].startswith("draft/") for f in m["files"])


def test_a_draft_model_build_packages_the_draft_hashed_like_the_model(draft_spec_uri: str, draft_dir: Path) -> None:
    import hashlib

    m = _manifest(draft_spec_uri)
    assert m["serving"]["speculative_config"] == {
        "method": "draft_model",
        "model": "draft",
        "num_speculative_tokens": 2,
    }
    files = {f["path"]: f["sha256"] for f in m["files"]}
    # the draft's weights are the separately built one-layer model's, byte for byte
    weights = hashlib.sha256((draft_dir / "model.safetensors").read_bytes()).hexdigest()
    assert files["draft/model.safetensors"] == f"sha256:{weights}"
    assert files["model.safetensors"] != files["draft/model.safetensors"]
    stages = {s["stage"]: s for s in m["provenance"]["stages"]}
    assert {"convert", "draft-convert", "draft"} <= set(stages)
    assert m["target"]["max_model_len"] == 2048  # the target's, not the draft's


def test_a_draft_with_another_tokenizer_is_refused_at_build() -> None:
    proc = run_cli(
        "build",
        "speculative=draft_model",
        "speculative.draft.source=kiln:tiny",
        "speculative.draft.synth.vocab_size=512",
    )
    assert proc.returncode != 0
    assert "speculative.draft.source: the draft model cannot propose tokens for this model" in proc.stderr
    assert "vocab_size is 512 and the target's 1024" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_draft_source_that_is_not_there_names_the_draft_key(tmp_path: Path) -> None:
    proc = run_cli("build", "speculative=draft_model", f"speculative.draft.source={tmp_path / 'none'}")
    assert proc.returncode != 0
    assert "speculative.draft.source" in proc.stderr
    assert "model.source" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["speculative=draft_model"], "speculative.draft.source"),
        (["speculative=ngram", "speculative.draft.source=kiln:tiny"], "speculative.draft.source"),
        (["speculative.draft.source=kiln:tiny"], "speculative.draft.source"),
        (["speculative.method=eagle"], "speculative.method"),
        (["speculative=ngram", "speculative.num_speculative_tokens=0"], "speculative.num_speculative_tokens"),
        (["speculative=ngram", "speculative.prompt_lookup_min=5"], "speculative.prompt_lookup_min"),
        (["speculative=ngram", "target.engine=transformers"], "speculative"),
        (["speculative=ngram", "compile=vllm"], "compile"),
    ],
)
def test_the_build_config_checks_the_speculation(hydra: None, overrides: list[str], key: str) -> None:
    from hydra import compose

    from build.config import validate
    from build.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose(config_name="build", overrides=overrides))
    assert any(k == key for k, _ in err.value.problems), err.value.problems


def test_a_synthesized_draft_follows_the_models_synth(hydra: None) -> None:
    from hydra import compose

    from build.config import validate

    cfg = validate(
        compose(
            config_name="build",
            overrides=["model=tiny_trained", "speculative=draft_model", "speculative.draft.source=kiln:tiny"],
        )
    )
    synth = cfg.speculative.draft.synth
    assert (synth.train_steps, synth.vocab_size, synth.num_hidden_layers) == (300, 1024, 1)
