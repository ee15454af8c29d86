"""Embeddings with the fake engine (kiln's own behaviour, in seconds): ``/v1/embeddings`` in OpenAI's schema (string,
list, token-id inputs; float and base64 encodings; usage) through the official ``openai`` client and raw HTTP,
LMI's embedding schema on ``/invocations``, every bad input a 400 naming its field, the task an artifact was built
for enforced on both sides, and the ``target.task`` vocabulary in the build config and the manifest.

The fake engine's vectors are a deterministic function of the token ids; the real engines' vectors are checked
against sentence-transformers in tests/test_embeddings_vllm.py.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeServer, configure_with_fake, fake_server, run_cli

pytestmark = pytest.mark.unit
TEXTS = ["a cat sits", "a kitten is sitting", "stock market crash", "the weather is nice today"]


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir, "task=embed", predict_timeout=0.5) as srv:
        yield srv


def embed(srv: FakeServer, **body: Any) -> httpx.Response:
    return httpx.post(srv.base + "/v1/embeddings", json=body, timeout=30)


def vectors(r: httpx.Response) -> list[list[float]]:
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return [d["embedding"] for d in data]


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_a_list_keeps_its_order_and_each_vector_is_the_inputs_own(server: FakeServer) -> None:
    alone = [vectors(embed(server, input=t))[0] for t in TEXTS]
    batch = vectors(embed(server, input=TEXTS))
    assert batch == alone
    assert len({tuple(v) for v in batch}) == len(TEXTS)  # distinct inputs, distinct vectors
    assert all(abs(norm(v) - 1.0) < 1e-9 for v in batch)  # normalized by default (option.normalize)


def test_token_id_inputs_equal_their_texts(server: FakeServer, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    ids = [tok(t)["input_ids"] for t in TEXTS[:2]]
    by_text = vectors(embed(server, input=TEXTS[:2]))
    assert vectors(embed(server, input=ids)) == by_text
    assert vectors(embed(server, input=ids[0])) == by_text[:1]  # one list of ids is one input


def test_usage_counts_the_input_tokens(server: FakeServer, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    body = embed(server, input=TEXTS).json()
    tokens = sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert (body["object"], body["model"], body["data"][0]["object"]) == ("list", "tiny-llama", "embedding")


def test_base64_is_little_endian_float32(server: FakeServer) -> None:
    import numpy as np

    floats = vectors(embed(server, input=TEXTS[:2]))
    encoded = vectors(embed(server, input=TEXTS[:2], encoding_format="base64"))
    for f, b in zip(floats, encoded, strict=True):
        assert isinstance(b, str)
        decoded = np.frombuffer(base64.b64decode(b), dtype="<f4")
        assert np.allclose(decoded, np.array(f, dtype=np.float32), rtol=0, atol=0)


def test_the_official_openai_client(server: FakeServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused")
    # The client asks for base64 by default and decodes it: both encodings agree through it.
    got = client.embeddings.create(model="tiny-llama", input=TEXTS)
    floats = client.embeddings.create(model="tiny-llama", input=TEXTS, encoding_format="float")
    expected = vectors(embed(server, input=TEXTS))
    for ours, via_b64, via_float in zip(expected, got.data, floats.data, strict=True):
        assert via_float.embedding == ours
        assert max(abs(a - b) for a, b in zip(via_b64.embedding, ours, strict=True)) < 1e-6  # float32 rounding
    assert got.usage.prompt_tokens > 0


def test_normalization_follows_the_request_then_the_option(server: FakeServer, tiny_dir: Path) -> None:
    raw = vectors(embed(server, input=TEXTS[0], use_activation=False))[0]
    assert norm(raw) > 1.5  # the fake's raw vectors are far from unit length
    unit = vectors(embed(server, input=TEXTS[0]))[0]
    assert max(abs(a / norm(raw) - b) for a, b in zip(raw, unit, strict=True)) < 1e-12
    with fake_server(tiny_dir, "task=embed", "normalize=false") as srv:
        assert vectors(embed(srv, input=TEXTS[0]))[0] == raw


def test_lmi_inputs_on_invocations_answer_a_list_of_vectors(server: FakeServer) -> None:
    expected = vectors(embed(server, input=TEXTS))
    one = httpx.post(server.base + "/invocations", json={"inputs": TEXTS[0]}, timeout=30)
    assert one.status_code == 200, one.text
    assert one.json() == expected[:1]
    many = httpx.post(server.base + "/invocations", json={"inputs": TEXTS}, timeout=30)
    assert many.json() == expected
    openai_body = httpx.post(server.base + "/invocations", json={"input": TEXTS}, timeout=30)
    assert vectors(openai_body) == expected


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": []}, "input", "empty list"),
        ({"input": ""}, "input", "empty string"),
        ({"input": ["fine", ""]}, "input", "input[1]"),
        ({"input": [[]]}, "input", "empty token list"),
        ({"input": 7}, "input", "input"),
        ({"input": {"text": "x"}}, "input", "input"),
        ({"input": ["text", 3]}, "input", "input"),
        ({"input": [10**9]}, "input", "token ids"),
        ({"input": "word " * 3000}, "input", "maximum context length"),
        ({}, "input", "input"),
        ({"input": "x", "dimensions": 8}, "dimensions", "Matryoshka"),
        ({"input": "x", "dimensions": 0}, "dimensions", "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
        ({"input": "x", "model": "other"}, "model", "does not exist"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server: FakeServer, body: dict[str, Any], param: str, says: str) -> None:
    r = httpx.post(server.base + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert says in err["message"], err
    assert vectors(embed(server, input="still serving"))  # nothing was lost


@pytest.mark.parametrize(
    ("body", "says"), [({"inputs": []}, "empty list"), ({"inputs": 3}, "inputs"), ({"inputs": [""]}, "empty")]
)
def test_bad_lmi_inputs_are_400s_naming_inputs(server: FakeServer, body: dict[str, Any], says: str) -> None:
    r = httpx.post(server.base + "/invocations", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == "inputs", r.json()
    assert says in r.json()["error"], r.json()


def test_an_embedding_model_refuses_generation_naming_its_task(server: FakeServer) -> None:
    for path, body in [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/invocations", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
        ("/invocations", {"prompt": "hi"}),
    ]:
        r = httpx.post(server.base + path, json=body, timeout=30)
        if path == "/invocations" and "inputs" in body:  # LMI's inputs on an embedding model: its embedding
            assert r.status_code == 200, r.text
            assert isinstance(r.json()[0], list), r.text
            continue
        assert r.status_code == 400, (path, r.text)
        assert "target.task=embed" in r.text, r.text
        assert "/v1/embeddings" in r.text, r.text


def test_a_generation_model_refuses_embeddings_naming_the_build(tiny_dir: Path) -> None:
    with fake_server(tiny_dir) as srv:
        r = embed(srv, input="hi")
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "model"
        assert "target.task=embed" in r.json()["error"]["message"]


def test_predict_timeout_bounds_an_embedding_request(server: FakeServer) -> None:
    r = embed(server, input=["[slow] one", "two"])
    assert r.status_code == 408, r.text
    assert r.json()["error"]["param"] == "predict_timeout"


def test_an_engine_failure_is_a_424_and_serving_goes_on(server: FakeServer) -> None:
    r = embed(server, input="[fail] please")
    assert r.status_code == 424, r.text
    assert vectors(embed(server, input="fine"))


# -- configuration: the task's names and where it comes from -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "env", "task"),
    [
        (["task=text-embedding"], {}, "embed"),  # LMI's option.task
        (["task=feature-extraction"], {}, "embed"),
        ([], {"HF_TASK": "text-embedding"}, "embed"),
        ([], {"OPTION_TASK": "text-generation"}, "generate"),
        ([], {}, "generate"),  # a Llama directory: its architecture generates
    ],
)
def test_the_task_from_lmi_names(tiny_dir: Path, options: list[str], env: dict[str, str], task: str) -> None:
    assert configure_with_fake(tiny_dir, options, env, engine="fake").plan.settings.task == task


def test_a_plain_encoder_directory_is_served_as_an_embedding_model(minilm_dir: Path) -> None:
    plan = configure_with_fake(minilm_dir, [], engine="fake").plan
    assert plan.settings.task == "embed"


def test_an_unknown_task_is_refused_naming_the_known_ones(tiny_dir: Path) -> None:
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"task.*'translation'.*text-embedding"):
        configure_with_fake(tiny_dir, ["task=translation"], engine="fake")


def test_an_artifact_keeps_its_task(tiny_uri: str, minilm_uri: str) -> None:
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"target\.task: task=embed is set, and the artifact was built for .*gen"):
        configure_with_fake(tiny_uri, ["task=embed"])
    assert configure_with_fake(minilm_uri, []).plan.settings.task == "embed"


def test_lora_is_refused_for_an_embedding_model(minilm_uri: str) -> None:
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"LoRA adapters are served for text generation.*task=embed"):
        configure_with_fake(minilm_uri, ["enable_lora=true"])


def test_vllm_runs_an_embedding_model_with_its_pooling_runner(minilm_uri: str) -> None:
    plan = configure_with_fake(minilm_uri, []).plan
    args = plan.spec.native_args(plan.settings)
    assert args["runner"] == "pooling"
    # sentence-transformers truncates at max_seq_length (256), so the artifact's limit is that, not 512 positions
    assert args["max_model_len"] == 256


# -- the build side: target.task in the config, the convert stage and the manifest -------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["target.task=classify"], "target.task"),
        (["target.task=embed", "quantize=awq"], "quantize"),
        (["target.task=embed", "compile=vllm"], "compile"),
        (["target.task=embed", "adapter.source=kiln:tiny-lora"], "adapter.source"),
        (["target.task=embed"], "model.source"),  # kiln:tiny is a generation model
    ],
)
def test_the_build_config_checks_the_task(hydra: None, overrides: list[str], key: str) -> None:
    from hydra import compose

    from build.config import validate
    from build.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose(config_name="build", overrides=overrides))
    assert any(k == key for k, _ in err.value.problems), err.value.problems


def test_the_embedding_artifact_carries_the_sentence_transformers_modules(minilm_uri: str) -> None:
    import json

    proc = run_cli("artifacts", "show", minilm_uri)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)["manifest"]
    assert manifest["target"]["task"] == "embed"
    assert manifest["target"]["max_model_len"] == 256
    files = {f["path"] for f in manifest["files"]}
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "vocab.txt"} <= files


def test_the_convert_stage_refuses_the_wrong_task_naming_the_fix(minilm_dir: Path, tiny_dir: Path) -> None:
    proc = run_cli("build", "model=hf", f"model.source={minilm_dir}", "model.name=minilm-gen")
    assert proc.returncode != 0
    assert "text-embedding model" in proc.stderr, proc.stderr
    assert "target.task=embed" in proc.stderr, proc.stderr
    proc = run_cli("build", "model=hf", f"model.source={tiny_dir}", "model.name=tiny-emb", "target.task=embed")
    assert proc.returncode != 0
    assert "target.task=generate" in proc.stderr, proc.stderr


def test_an_unknown_sentence_transformers_module_is_refused(minilm_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    src = tmp_path / "dense"
    shutil.copytree(minilm_dir, src)
    modules = json.loads((src / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (src / "modules.json").write_text(json.dumps(modules))
    proc = run_cli("build", "model=hf", f"model.source={src}", "model.name=dense", "target.task=embed")
    assert proc.returncode != 0
    assert "Dense" in proc.stderr, proc.stderr
    assert "model.source" in proc.stderr, proc.stderr


def test_the_manifest_writes_the_task_only_when_it_is_not_generation() -> None:
    from artifacts.errors import ManifestError
    from artifacts.manifest import Target

    gen = Target("vllm", "", ("cpu",), "bfloat16", 1, 256)
    assert "task" not in gen.to_dict()  # generation artifacts read by runtimes older than the field
    assert Target.from_dict(gen.to_dict()).task == "generate"
    emb = Target("vllm", "", ("cpu",), "float32", 1, 256, task="embed")
    assert Target.from_dict(emb.to_dict()) == emb
    with pytest.raises(ManifestError, match=r"target\.task: unknown task 'rank'"):
        Target.from_dict({**emb.to_dict(), "task": "rank"})


def test_runtime_config_shows_the_task(minilm_uri: str) -> None:
    import json

    proc = run_cli("runtime", "config", minilm_uri, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["task"] == "embed"
    assert doc["engine_args"]["runner"] == "pooling"
    text = run_cli("runtime", "config", minilm_uri)
    assert "embeddings" in text.stdout.splitlines()[-1], text.stdout
