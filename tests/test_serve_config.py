"""The serving configuration: one precedence (artifact < serving.properties < environment < command line), LMI,
TGI and SageMaker names, pass-through of engine-native keys, every problem in one message, the artifact's target
block winning over contradicting values; and the response forms the configuration selects, on real servers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from artifacts.manifest import Manifest, Target
from runtime.config import (
    ConfigError,
    Entry,
    Origin,
    Sources,
    artifact_entries,
    read_env,
    read_properties,
    resolve_config,
)
from runtime.exitcodes import EX_CONFIG
from tests.conftest import FakeServer, fake_server, run_cli

TARGET = Target("vllm", "", ("cpu",), "bfloat16", 1, 2048)


def manifest(serving: dict[str, object] | None = None, **target: object) -> Manifest:
    t = Target(**{**TARGET.__dict__, **target})  # type: ignore[arg-type]
    return Manifest.create("tiny", [], t, serving or {}, {})


def entries(source: str, **values: object) -> list[Entry]:
    return [Entry(k, v, Origin(source, k)) for k, v in values.items()]


def props(tmp_path: Path, text: str) -> list[Entry]:
    f = tmp_path / "serving.properties"
    f.write_text(text)
    return read_properties(f)


def accepts(*keys: str) -> object:
    return lambda engine: set(keys)


@pytest.mark.unit
def test_each_source_overrides_the_one_below(tmp_path: Path) -> None:
    m = manifest({"max_num_seqs": 16})
    layers = Sources()
    assert resolve_config(layers, None).config.max_num_seqs is None  # default: the engine's (runtime/settings.py)
    steps = [
        ("artifact", lambda: setattr(layers, "artifact", artifact_entries(m.serving)), 16),
        ("serving.properties", lambda: setattr(layers, "properties", props(tmp_path, "option.max_num_seqs=8\n")), 8),
        ("env", lambda: setattr(layers, "env", read_env({"OPTION_MAX_NUM_SEQS": "4"})[0]), 4),
        ("cli", lambda: setattr(layers, "cli", entries("cli", max_num_seqs=2)), 2),
    ]
    for source, add, value in steps:
        add()  # type: ignore[no-untyped-call]
        r = resolve_config(layers, m.target)
        assert r.config.max_num_seqs == value
        assert r.origin("max_num_seqs").source == source


@pytest.mark.unit
def test_lmi_tgi_and_sagemaker_names(tmp_path: Path) -> None:
    env, hints = read_env(
        {
            "MAX_BATCH_SIZE": "12",
            "MAX_CONCURRENT_REQUESTS": "64",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "90",
            "ENABLE_CUDA_GRAPHS": "false",
            "SM_NUM_GPUS": "2",
            "PATH": "/usr/bin",
        }
    )
    p = props(tmp_path, "option.dtype=fp16\noption.rolling_batch=scheduler\njob_queue_size: 50\n# comment\n")
    r = resolve_config(Sources(properties=p, env=env, hints=hints), None)
    c = r.config
    assert (c.max_num_seqs, c.job_queue_size, c.predict_timeout, c.enforce_eager) == (12, 64, 90.0, True)
    assert (c.dtype, c.engine, c.tensor_parallel_degree) == ("float16", "transformers", 2)
    assert str(r.origin("max_num_seqs")) == "env MAX_BATCH_SIZE"
    assert str(r.origin("dtype")) == "serving.properties option.dtype"
    # SM_NUM_GPUS describes the instance: an artifact's target block fixes the degree instead.
    assert resolve_config(Sources(hints=hints), manifest().target).config.tensor_parallel_degree is None


@pytest.mark.unit
def test_native_name_beats_its_container_translation_without_conflict() -> None:
    env, _ = read_env({"OPTION_MAX_ROLLING_BATCH_SIZE": "8", "MAX_BATCH_SIZE": "4"})
    r = resolve_config(Sources(env=env), None)
    assert r.config.max_num_seqs == 8
    assert str(r.origin("max_num_seqs")) == "env OPTION_MAX_ROLLING_BATCH_SIZE"


@pytest.mark.unit
def test_all_problems_in_one_message(tmp_path: Path) -> None:
    p = props(
        tmp_path,
        "option.max_rolling_batch_size=8\noption.max_num_seqs=16\n"  # two names, two values
        "option.not_an_engine_arg=1\n"  # unknown
        "option.max_model_len=4096\n"  # beyond target.max_model_len=2048
        "option.output_formatter=xml\n"  # invalid value
        "batch_size=4\n",  # LMI dynamic batching: unsupported
    )
    env, _ = read_env({"OPTION_TENSOR_PARALLEL_DEGREE": "two"})
    with pytest.raises(ConfigError) as err:
        resolve_config(Sources(properties=p, env=env), manifest().target, accepts("max_num_batched_tokens"))
    text = str(err.value)
    for needle in (
        "option.max_rolling_batch_size",
        "option.max_num_seqs",
        "option.not_an_engine_arg",
        "not a kiln setting and not a vllm engine argument",
        "env OPTION_TENSOR_PARALLEL_DEGREE",
        "option.output_formatter",
        "batch_size",
    ):
        assert needle in text, text
    assert len(err.value.problems) == 6
    # max_model_len is checked against the target only once the values themselves are valid
    with pytest.raises(ConfigError, match="target.max_model_len=2048"):
        resolve_config(Sources(properties=props(tmp_path, "option.max_model_len=4096\n")), manifest().target)


@pytest.mark.unit
def test_engine_native_keys_pass_through_only_when_accepted(tmp_path: Path) -> None:
    p = props(tmp_path, "option.max_rolling_batch_prefill_tokens=512\noption.lora_dtype=float32\n")
    r = resolve_config(Sources(properties=p), manifest().target, accepts("max_num_batched_tokens", "lora_dtype"))
    assert r.config.engine_args == {"max_num_batched_tokens": 512, "lora_dtype": "float32"}
    assert str(r.origin("engine_args.max_num_batched_tokens")) == (
        "serving.properties option.max_rolling_batch_prefill_tokens"
    )
    with pytest.raises(ConfigError, match=r"option.lora_dtype: not a kiln setting and not a transformers engine"):
        resolve_config(Sources(properties=p), manifest(engine="transformers").target, accepts("max_num_batched_tokens"))


@pytest.mark.unit
def test_target_block_wins_over_contradicting_values() -> None:
    cli = entries("cli", engine="transformers", tensor_parallel_degree=2, dtype="float16")
    with pytest.raises(ConfigError) as err:
        resolve_config(Sources(cli=cli), manifest(quantization="awq").target)
    text = str(err.value)
    assert "target.engine='vllm'" in text
    assert "target.tensor_parallel_degree=1" in text
    assert "quantized (awq)" in text
    ok = resolve_config(Sources(cli=entries("cli", dtype="float16", max_model_len=1024)), manifest().target)
    assert (ok.config.dtype, ok.config.max_model_len) == ("float16", 1024)


@pytest.mark.unit
def test_ignored_lmi_keys_are_listed_and_container_mode_listens_everywhere(tmp_path: Path) -> None:
    p = props(tmp_path, "engine=Python\nminWorkers=1\noption.entryPoint=djl_python.lmi_vllm.vllm_async_service\n")
    r = resolve_config(Sources(properties=p), manifest().target, container=True)
    assert [o.name for o, _ in r.ignored] == ["engine", "minWorkers", "option.entryPoint"]
    assert (r.config.host, r.config.port) == ("0.0.0.0", 8080)
    with pytest.raises(ConfigError, match="custom handler"):
        resolve_config(Sources(properties=props(tmp_path, "option.entryPoint=model.py\n")), manifest().target)


# -- through the real CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact_dir(tiny_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cfg") / "model"
    assert run_cli("artifacts", "pull", tiny_uri, str(d)).returncode == 0
    return d


def show(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    proc = run_cli("runtime", "config", *args, "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["settings"]  # type: ignore[no-any-return]


@pytest.mark.integration
def test_config_command_shows_each_value_and_its_source(artifact_dir: Path) -> None:
    (artifact_dir / "serving.properties").write_text("option.max_rolling_batch_size=8\njob_queue_size=50\n")
    env = {"OPTION_JOB_QUEUE_SIZE": "40", "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "30"}
    s = show(str(artifact_dir), "--predict-timeout", "20", env=env)
    assert s["max_num_seqs"] == {"value": 8, "source": "serving.properties option.max_rolling_batch_size"}
    assert s["job_queue_size"] == {"value": 40, "source": "env OPTION_JOB_QUEUE_SIZE"}
    assert s["predict_timeout"] == {"value": 20.0, "source": "cli --predict-timeout"}
    assert s["enforce_eager"] == {"value": False, "source": "default"}  # the build records only what it sets
    assert s["port"] == {"value": 8080, "source": "default"}
    table = run_cli("runtime", "config", str(artifact_dir), env=env)
    assert "serving.properties option.max_rolling_batch_size" in table.stdout
    assert "-> tiny-llama on vllm (cpu" in table.stdout


@pytest.mark.integration
def test_sagemaker_model_dir_and_model_id_redirect(artifact_dir: Path, tiny_uri: str, tmp_path: Path) -> None:
    s = show(env={"SM_MODEL_DIR": str(artifact_dir)})
    assert s["model"] == {"value": str(artifact_dir), "source": "env SM_MODEL_DIR"}
    assert (s["host"]["value"], s["port"]["value"]) == ("0.0.0.0", 8080)
    sm = tmp_path / "sm"  # an LMI-style model directory: only serving.properties naming the model
    sm.mkdir()
    (sm / "serving.properties").write_text(f"option.model_id={tiny_uri}\noption.max_rolling_batch_size=6\n")
    s = show(env={"SM_MODEL_DIR": str(sm)})
    assert s["model"] == {"value": tiny_uri, "source": "serving.properties option.model_id"}
    assert s["max_num_seqs"]["value"] == 6
    proc = run_cli("runtime", "config", env={"SM_MODEL_DIR": str(sm)})
    assert "-> tiny-llama on vllm" in proc.stdout


@pytest.mark.integration
def test_vllm_engine_args_pass_through_and_unknown_keys_refuse_to_start(artifact_dir: Path) -> None:
    (artifact_dir / "serving.properties").write_text("option.max_rolling_batch_prefill_tokens=512\n")
    s = show(str(artifact_dir), "--option", "enable_prefix_caching=false", "--option", "seed=3")
    assert s["engine_args.max_num_batched_tokens"]["value"] == 512
    assert s["engine_args.seed"] == {"value": 3, "source": "cli --option seed"}
    assert s["enable_prefix_caching"]["value"] is False
    env = {"OPTION_MAX_NUM_SEQS": "0", "OPTION_FLUX_CAPACITOR": "on"}
    proc = run_cli("runtime", "serve", str(artifact_dir), "--max-model-len", "9999", env=env, timeout=300)
    assert proc.returncode == EX_CONFIG
    assert "Traceback" not in proc.stderr
    for needle in (
        "env OPTION_FLUX_CAPACITOR",
        "env OPTION_MAX_NUM_SEQS",
        "cli --max-model-len",
        "target.max_model_len",
    ):
        assert needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n  - ") == 3  # one message, every problem listed


# -- response forms chosen by configuration (kiln's own behaviour: the fake engine) -------------------------------


@pytest.fixture(scope="module")
def formatted(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeServer, FakeServer]]:
    """Two servers: TGI-compatible forms (set by the environment), and SSE streaming plus a chat template override
    (set by serving.properties in the model directory)."""
    tmp = tmp_path_factory.mktemp("forms")
    d = tmp / "model"
    shutil.copytree(tiny_dir, d)
    (tmp / "template.jinja").write_text("Say something.")  # ignores the messages entirely
    (d / "serving.properties").write_text(
        f"option.output_formatter=sse\noption.chat_template={tmp / 'template.jinja'}\n"
    )
    with fake_server(tiny_dir, env={"OPTION_TGI_COMPAT": "true"}) as tgi, fake_server(d) as sse:
        yield tgi, sse


@pytest.mark.unit
def test_tgi_compat_array_and_sse_stream(formatted: tuple[FakeServer, FakeServer]) -> None:
    tgi, _ = formatted
    body = {"inputs": "The cat", "parameters": {"max_new_tokens": 4}}
    r = httpx.post(tgi.base + "/invocations", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list)
    assert out[0]["details"]["generated_tokens"] == len(out[0]["details"]["tokens"])  # details by default
    assert {"id", "text", "logprob", "special"} <= set(out[0]["details"]["tokens"][0])
    with httpx.stream("POST", tgi.base + "/invocations", json={**body, "stream": True}, timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(len(events)))
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["details"]["finish_reason"] == "length"
    assert isinstance(events[-1]["generated_text"], str)


@pytest.mark.unit
def test_sse_formatter_and_chat_template_from_serving_properties(formatted: tuple[FakeServer, FakeServer]) -> None:
    _, sse = formatted
    body = {"inputs": "The cat", "parameters": {"max_new_tokens": 4}, "stream": True}
    with httpx.stream("POST", sse.base + "/invocations", json=body, timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert {"id", "text", "log_prob"} <= set(events[0]["token"])
    assert "generated_text" in events[-1]
    replies = [
        httpx.post(
            sse.base + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0},
            timeout=60,
        ).json()
        for q in ("What color is the sky?", "Name a prime number bigger than one hundred.")
    ]
    # The template ignores the messages: both prompts render to the same tokens, so greedy replies match.
    assert replies[0]["usage"]["prompt_tokens"] == replies[1]["usage"]["prompt_tokens"]
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]


# -- where the model is, and container mode -------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("var", ["HF_MODEL_ID", "OPTION_MODEL_ID", "SM_MODEL_DIR"])
def test_container_configuration_listens_on_all_interfaces(tiny_dir: Path, var: str) -> None:
    """LMI's container variables (and SageMaker's model directory) mean a container: 0.0.0.0:8080, as LMI."""
    from runtime.app import configure

    c = configure({}, [], {var: str(tiny_dir)}).resolved
    assert (c.config.host, c.config.port) == ("0.0.0.0", 8080)
    assert str(c.origin("host")) == "default (container mode)"
    for env, want in (({"OPTION_HOST": "127.0.0.1"}, "127.0.0.1"), ({"SERVING_HOST": "10.1.2.3"}, "10.1.2.3")):
        assert configure({}, [], {var: str(tiny_dir), **env}).resolved.config.host == want
    assert configure({"host": "::1"}, [], {var: str(tiny_dir)}).resolved.config.host == "::1"


@pytest.mark.unit
def test_a_model_named_on_the_command_line_stays_on_loopback(tiny_dir: Path) -> None:
    from runtime.app import configure

    c = configure({"model": str(tiny_dir)}, [], {"HF_MODEL_ID": "ignored/by-the-argument"}).resolved
    assert c.config.host == "127.0.0.1"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "hub"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("Qwen/Qwen2.5-0.5B", True),
        ("tiny-llama:latest", False),
        ("s3://bucket/llama/", False),
        ("file:///store/x:latest", False),
        ("./models/llama", False),
        ("a/b/c", False),
    ],
)
def test_hub_ids_are_told_from_other_locations(text: str, hub: bool) -> None:
    from runtime.config import is_hub_id

    assert is_hub_id(text) is hub


@pytest.mark.unit
def test_hub_id_offline_is_refused_at_once_naming_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    from artifacts.errors import ArtifactError
    from runtime.app import configure

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    with pytest.raises(ArtifactError) as err:
        configure({}, [], {"HF_MODEL_ID": "meta-llama/Llama-3.1-8B", "HF_TOKEN": "hf_secret_value_123"})
    text = str(err.value)
    assert "'meta-llama/Llama-3.1-8B' is a Hugging Face hub id, and HF_HUB_OFFLINE is set" in text
    assert "local directory or an s3:// prefix" in text
    assert "neither a store URI" not in text
    assert "hf_secret_value_123" not in text


@pytest.mark.unit
def test_hub_id_from_the_local_hub_cache_offline_and_a_revision_it_lacks(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's own offline mechanism: a populated hub cache serves the id; a revision the cache lacks is
    named with the revisions it holds."""
    from huggingface_hub import constants

    from artifacts.errors import ArtifactError
    from runtime.app import configure

    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    startup = configure({}, [], {"HF_MODEL_ID": "acme/tiny-llama", "OPTION_ROLLING_BATCH": "scheduler"})
    assert startup.model.kind == "Hugging Face hub checkpoint"
    assert startup.model.path == repo / "snapshots" / commit
    with pytest.raises(ArtifactError) as err:
        configure({}, [], {"HF_MODEL_ID": "acme/tiny-llama", "HF_MODEL_REVISION": "v9"})
    assert "'acme/tiny-llama' at revision 'v9' is not in the local Hugging Face cache" in str(err.value)
    assert "the cache holds main" in str(err.value)


@pytest.mark.unit
def test_batch_default_is_the_engines_and_config_shows_it(tiny_dir: Path) -> None:
    """LMI's max_rolling_batch_size defaults (256 for vLLM, 32 for its other backends), on CPU bounded by the KV
    cache at full length: the tiny model's 2048 tokens take 2 KiB each (4 layers x 2 KV heads x 64 x 2 bytes x
    K and V), so 1 GiB holds 256 of them, and 64 MiB only 16."""
    from runtime.app import configure

    vllm = configure({"model": str(tiny_dir)}, [], {}).plan
    assert (vllm.spec.name, vllm.settings.max_num_seqs, vllm.settings.kv_cache_gib) == ("vllm", 256, 1.0)
    assert "256" in vllm.chosen["max_num_seqs"].why
    small = configure({"model": str(tiny_dir), "kv_cache_gib": 1 / 16}, [], {}).plan
    assert small.settings.max_num_seqs == 16
    hf = configure({"model": str(tiny_dir), "engine": "transformers"}, [], {}).plan
    assert hf.settings.max_num_seqs == 32
    mine = configure({"model": str(tiny_dir), "max_num_seqs": 7}, [], {}).plan
    assert mine.settings.max_num_seqs == 7
    assert "max_num_seqs" not in mine.chosen


@pytest.mark.unit
def test_startup_problems_are_reported_together(tiny_dir: Path) -> None:
    """A bad chat template, a bad value and a target the host cannot give, in one message."""
    from runtime.app import configure

    with pytest.raises(ConfigError) as err:
        configure(
            {"model": str(tiny_dir), "chat_template": "/no/such/template.jinja", "tensor_parallel_degree": 64},
            ["max_num_seqs=0"],
            {},
        )
    text = str(err.value)
    assert len(err.value.problems) == 3, text
    assert "cli --chat-template='/no/such/template.jinja': no such file" in text
    assert "cli --option max_num_seqs='0': Input should be greater than or equal to 1" in text
    assert "target.tensor_parallel_degree: 64 cpu devices wanted" in text


@pytest.mark.unit
def test_lora_settings_from_lmi_and_sagemaker_names(tmp_path: Path) -> None:
    p = props(tmp_path, "option.enable_lora=true\noption.max_loras=2\noption.adapters=a=/opt/ml/a, b=s3://x/b:v1\n")
    env, _ = read_env({"SM_VLLM_MAX_LORA_RANK": "32", "SM_VLLM_MAX_CPU_LORAS": "8"})
    r = resolve_config(Sources(properties=p, env=env), manifest().target)
    c = r.config
    assert (c.enable_lora, c.max_loras, c.max_lora_rank, c.max_cpu_loras) == (True, 2, 32, 8)
    assert c.adapters == {"a": "/opt/ml/a", "b": "s3://x/b:v1"}
    assert c.engine_args == {}  # kiln settings now, not vLLM pass-through
    env, _ = read_env({"SM_VLLM_ENABLE_LORA": "true", "OPTION_ENABLE_LORA": "false"})
    with pytest.raises(ConfigError, match="set the same setting"):
        resolve_config(Sources(env=env), manifest().target)
    with pytest.raises(ConfigError, match="adapters.*expected name=src pairs"):
        resolve_config(Sources(properties=props(tmp_path, "option.adapters=just-a-path\n")), manifest().target)
