"""The deepspeed engine: DeepSpeed-Inference's AutoTP shards the model, transformers' batching manager serves it.

The configuration mapping is checked against the installed deepspeed's own ``DeepSpeedInferenceConfig`` (0.19.8,
the version the engine was written for); the integration test serves a TP=1 and a TP=2 artifact on this CPU and
compares their greedy tokens with the transformers engine's. In float32 the three agree token for token (measured:
the tiny model, four prompts x 16 tokens); in bfloat16 the ranks' other summation order flips near-ties.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from runtime.engines.base import EngineError, EngineSettings
from runtime.exitcodes import EX_CONFIG
from tests.conftest import Server, build, run_cli, start_server, stop_cleanly

PROMPTS = ["The grass is", "Once upon a time", "The capital of France is", "1, 2, 3,"]


def settings(tmp_path: Path, tp: int = 1, heads: int = 4, kv_heads: int = 2, **extra: object) -> EngineSettings:
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads, "dtype": "bfloat16"})
    )
    return EngineSettings(model_dir=tmp_path, tensor_parallel_degree=tp, device="cpu", extra=extra)


@pytest.mark.unit
def test_written_for_the_installed_deepspeed() -> None:
    from importlib.metadata import version

    assert version("deepspeed") == "0.19.8"  # the fields, aliases and env variables below were read from it


@pytest.mark.unit
def test_init_inference_gets_kilns_settings_and_the_operators_keys(tmp_path: Path) -> None:
    from deepspeed.inference.config import DeepSpeedInferenceConfig

    from runtime.engines.deepspeed.engine import inference_config, split_extra

    s = settings(tmp_path, tp=2, max_tokens=512, enable_cuda_graph=False, max_requests_per_batch=8)
    ds, rest = split_extra(s.extra)
    assert rest == {"max_requests_per_batch": 8}  # the batching manager's key stays with it
    conf = inference_config(s, ds)
    assert conf == {
        "tensor_parallel": {"tp_size": 2},
        "dtype": "bfloat16",  # the checkpoint's, from config.json
        "replace_with_kernel_inject": False,
        "max_out_tokens": 512,  # LMI's max_tokens is DeepSpeed's alias of max_out_tokens
        "enable_cuda_graph": False,
    }
    parsed = DeepSpeedInferenceConfig(**conf)  # deepspeed's own validation takes every key kiln passes
    assert parsed.tensor_parallel.tp_size == 2
    assert parsed.max_out_tokens == 512
    assert parsed.replace_with_kernel_inject is False


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mp_size", 2, "set tensor_parallel_degree instead"),
        ("tensor_parallel", {"tp_size": 2}, "set tensor_parallel_degree instead"),
        ("dtype", "float16", "set dtype instead"),
        ("replace_with_kernel_inject", True, "paged KV cache"),
        ("kernel_inject", True, "paged KV cache"),  # deepspeed's alias, refused by the field it names
        ("enable_cuda_graph", True, "InferenceEngine.forward"),
    ],
)
def test_keys_kiln_owns_or_cannot_serve_are_refused_by_name(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    from runtime.engines.deepspeed.engine import inference_config, split_extra

    s = settings(tmp_path, **{key: value})
    with pytest.raises(EngineError) as err:
        inference_config(s, split_extra(s.extra)[0])
    assert key in str(err.value)
    assert message in str(err.value)


@pytest.mark.unit
def test_a_tp_degree_that_does_not_divide_the_heads_is_refused_with_the_ones_that_do(tmp_path: Path) -> None:
    from runtime.engines.deepspeed.engine import check_shardable

    check_shardable(settings(tmp_path, tp=2))
    with pytest.raises(EngineError) as err:
        check_shardable(settings(tmp_path, tp=3, heads=6, kv_heads=2))
    assert "num_key_value_heads=2" in str(err.value)
    assert "one of [1, 2]" in str(err.value)


@pytest.mark.unit
def test_each_rank_gets_the_variables_deepspeeds_shared_memory_all_reduce_reads() -> None:
    from runtime.engines.deepspeed.engine import rank_env

    env = rank_env(1, 2, 29500)
    assert env["RANK"] == "1"
    assert env["WORLD_SIZE"] == "2"
    assert env["MASTER_PORT"] == "29500"
    assert env["LOCAL_SIZE"] == "2"  # without it deepspeed 0.19.8's shm all-reduce dereferences unmapped buffers


@pytest.mark.unit
def test_worker_settings_survive_the_round_trip(tmp_path: Path) -> None:
    from runtime.engines.deepspeed.engine import settings_from_json, settings_json

    s = EngineSettings(model_dir=tmp_path, tensor_parallel_degree=2, device="cpu", dtype="float32", max_num_seqs=4)
    back = settings_from_json(settings_json(s))
    assert (back.model_dir, back.tensor_parallel_degree, back.dtype, back.max_num_seqs) == (tmp_path, 2, "float32", 4)


@pytest.mark.unit
def test_without_deepspeed_installed_the_error_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.engines.deepspeed.engine import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(EngineError) as err:
        import_deepspeed()
    assert "pip install 'deepspeed" in str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("options", "env"),
    [
        (["rolling_batch=deepspeed", "tensor_parallel_degree=2"], {}),  # serving.properties / --option
        ([], {"OPTION_ROLLING_BATCH": "deepspeed", "TENSOR_PARALLEL_DEGREE": "2"}),  # LMI's container variables
    ],
)
def test_lmi_names_pick_the_engine_and_its_degree(tiny_dir: Path, options: list[str], env: dict[str, str]) -> None:
    from runtime.app import configure

    plan = configure({"model": str(tiny_dir)}, options, env).plan
    assert plan.spec.name == "deepspeed"
    assert plan.settings.tensor_parallel_degree == 2
    assert plan.spec.native_args(plan.settings)["init_inference"]["tensor_parallel"] == {"tp_size": 2}


def greedy(server: Server) -> list[list[str]]:
    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    out = client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS,
        max_tokens=16,
        temperature=0,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return [c.logprobs.tokens for c in out.choices if c.logprobs]


@pytest.mark.integration
def test_tp1_and_tp2_answer_as_the_transformers_engine_does(tmp_path: Path) -> None:
    answers = {}
    for name, overrides in {
        "transformers": ["target.engine=transformers"],
        "deepspeed-tp1": ["target.engine=deepspeed"],
        "deepspeed-tp2": ["target.engine=deepspeed", "target.tensor_parallel_degree=2"],
    }.items():
        uri = build("model=tiny", *overrides)
        if name == "deepspeed-tp2":
            shown = run_cli("runtime", "config", "--json", uri)
            assert shown.returncode == 0, shown.stderr
            args = json.loads(shown.stdout)["engine_args"]  # stdout is JSON alone: DeepSpeed's log goes to stderr
            assert args["init_inference"]["tensor_parallel"] == {"tp_size": 2}
        (tmp_path / name).mkdir()
        server = start_server(uri, tmp_path / name, "--dtype", "float32", timeout=600)
        try:
            answers[name] = greedy(server)
        finally:
            stop_cleanly(server)
    assert len(answers["transformers"]) == len(PROMPTS)
    assert all(len(t) == 16 for t in answers["transformers"])
    assert answers["deepspeed-tp1"] == answers["transformers"]
    assert answers["deepspeed-tp2"] == answers["transformers"]


@pytest.mark.unit
def test_the_engines_check_lists_every_refusal_before_the_server_starts(tmp_path: Path) -> None:
    from runtime.engines.deepspeed import SPEC

    assert SPEC.check(settings(tmp_path, tp=2)) == []
    problems = SPEC.check(settings(tmp_path, tp=3, heads=6, kv_heads=2, replace_with_kernel_inject=True))
    assert len(problems) == 2
    assert "replace_with_kernel_inject=True" in problems[0]
    assert "one of [1, 2]" in problems[1]


@pytest.mark.integration
def test_serve_refuses_an_unservable_deepspeed_key_before_it_listens() -> None:
    uri = build("model=tiny", "target.engine=deepspeed")
    proc = run_cli("runtime", "serve", uri, "--port", "1", "--option", "replace_with_kernel_inject=true", timeout=120)
    assert proc.returncode == EX_CONFIG, proc.stderr[-2000:]
    assert "replace_with_kernel_inject=True" in proc.stderr
    assert "listening on" not in proc.stderr
    assert "Traceback" not in proc.stderr
