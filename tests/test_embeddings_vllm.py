"""Embeddings on the real engines, through real HTTP: the all-MiniLM-L6-v2 embedding artifact (built by ``python -m
build … target.task=embed``) served by vLLM's pooling runner and by the transformers engine, each vector compared
with what ``sentence-transformers`` computes for the same text on this machine.

Tolerance: every cosine similarity between two texts within 1e-4 of sentence-transformers' (measured: vLLM 0.78094,
sentence-transformers 0.78094 for "a cat sits" / "a kitten is sitting", both float32 on CPU), and each vector's
cosine with sentence-transformers' own vector above 0.9999.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import Server, build, start_server, stop_cleanly

pytestmark = pytest.mark.integration
TEXTS = [
    "a cat sits",
    "a kitten is sitting",
    "stock market crash",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors; similar meanings land close together.",
    "la vie est belle",
]
COS_TOLERANCE = 1e-4
SELF_COS = 0.9999


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> np.ndarray:
    """sentence-transformers' vectors of TEXTS (normalized: the model ends in a Normalize module)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    return np.asarray(model.encode(TEXTS, convert_to_numpy=True), dtype=np.float64)


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def server(
    request: pytest.FixtureRequest, minilm_uri: str, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    uri = minilm_uri
    if request.param == "transformers":
        uri = build(
            "model=hf",
            f"model.source={minilm_dir}",
            "model.name=minilm-hf",
            "model.dtype=auto",
            "target.task=embed",
            "target.engine=transformers",
        )
    srv = start_server(uri, tmp_path_factory.mktemp(f"emb-{request.param}"), timeout=600)
    yield srv
    stop_cleanly(srv)


def embed(srv: Server, inputs: Any, **extra: Any) -> np.ndarray:
    r = httpx.post(srv.base + "/v1/embeddings", json={"input": inputs, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float64)


def test_cosine_similarities_agree_with_sentence_transformers(server: Server, reference: np.ndarray) -> None:
    ours = embed(server, TEXTS)
    assert ours.shape == reference.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.abs(ours @ ours.T - reference @ reference.T).max() < COS_TOLERANCE
    assert (np.sum(ours * reference, axis=1) > SELF_COS).all()
    sims = ours @ ours.T
    assert sims[0, 1] > 0.7 > 0.2 > sims[0, 2]  # a cat and a kitten are close; a market crash is not


def test_concurrent_and_batched_inputs_keep_their_order(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    batch = embed(server, TEXTS)
    with ThreadPoolExecutor(len(TEXTS)) as pool:
        alone = list(pool.map(lambda t: embed(server, t)[0], TEXTS))
    assert np.abs(np.stack(alone) - batch).max() < 1e-5  # batched with others or alone: the same vector


def test_lmi_schema_and_the_openai_client_give_the_same_vectors(server: Server) -> None:
    from openai import OpenAI

    batch = embed(server, TEXTS[:3])
    r = httpx.post(server.base + "/invocations", json={"inputs": TEXTS[:3]}, timeout=120)
    assert r.status_code == 200, r.text
    assert np.abs(np.asarray(r.json()) - batch).max() < 1e-5
    client = OpenAI(base_url=server.base + "/v1", api_key="unused")
    got = client.embeddings.create(model=client.models.list().data[0].id, input=TEXTS[:3])  # base64 on the wire
    assert np.abs(np.asarray([d.embedding for d in got.data]) - batch).max() < 1e-6


def test_unnormalized_vectors_on_request(server: Server, reference: np.ndarray) -> None:
    raw = embed(server, TEXTS[:2], use_activation=False)
    assert (np.linalg.norm(raw, axis=1) > 1.5).all()  # mean-pooled MiniLM states are several units long
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert (np.sum(unit * reference[:2], axis=1) > SELF_COS).all()


def test_too_long_input_and_generation_are_refused_and_serving_goes_on(server: Server) -> None:
    r = httpx.post(server.base + "/v1/embeddings", json={"input": ["fine", "word " * 400]}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "input", err
    assert "256 tokens" in err["message"], err
    assert "input[1]" in err["message"], err
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "a cat", "max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    assert "target.task=embed" in r.text, r.text
    r = httpx.post(server.base + "/v1/embeddings", json={"input": "x", "dimensions": 8}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "dimensions", r.text
    assert "pulled" not in r.text  # vLLM's message names the model by its path; kiln's does not
    assert embed(server, "still serving").shape == (1, 384)
