"""Speculative decoding on vLLM's CPU engine through real HTTP: n-gram prompt lookup set by LMI's
``OPTION_SPECULATIVE_CONFIG`` and a draft model packaged in the artifact (speculative=draft_model). Greedy outputs
equal the same model's without speculation (the session's kiln server of the tiny artifact), and kiln's acceptance
series on /metrics agree with vLLM's own counters in the same scrape."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Server, VllmPair, start_server, stop_cleanly, wait_ready

pytestmark = pytest.mark.integration

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = [
    "one two three four one two three four one two three four one two",
    "the cat sat on the mat. the cat sat on the mat. the cat sat",
    "What color is the sky?",
]


@pytest.fixture(
    scope="module",
    # CI runs the draft model (kiln packages it and resolves it inside the artifact); n-gram prompt lookup, which
    # `nox -s bench -- speculative` also runs on vLLM, with `nox -s tests -- tests`: one vLLM start each.
    params=["draft_model", pytest.param("ngram", marks=pytest.mark.slow)],
)
def server(
    request: pytest.FixtureRequest,
    tiny_uri: str,
    draft_spec_uri: str,
    vllm_pair: VllmPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Server]]:
    """A speculating server: every test here uses the vLLM pair (its kiln server is the reference without
    speculation), so this module runs with the pair's tests, last (tests/conftest.py)."""
    method = request.param
    tmp = tmp_path_factory.mktemp(f"speculative-{method}")
    if method == "ngram":
        srv = start_server(tiny_uri, tmp, env={"OPTION_SPECULATIVE_CONFIG": json.dumps(NGRAM)}, wait=False)
    else:
        srv = start_server(draft_spec_uri, tmp, wait=False)
    try:
        wait_ready(srv, 900)
        yield method, srv
        stop_cleanly(srv)
    finally:
        if srv.proc.poll() is None:
            srv.stop(timeout=60, group=True)


def _greedy(base: str, prompt: str) -> tuple[str, int]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
    assert r.usage is not None
    return r.choices[0].text, r.usage.completion_tokens


def _series(text: str, name: str) -> float:
    """The value of an unlabelled series, or the sum over its labelled samples (vLLM labels by model and engine)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{"))]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_greedy_outputs_equal_those_without_speculation(server: tuple[str, Server], vllm_pair: VllmPair) -> None:
    """The reference is the same tiny artifact served by kiln without speculation (the vLLM pair's)."""
    for prompt in PROMPTS:
        expected = _greedy(vllm_pair.kiln.base, prompt)
        assert expected[1] == 32
        assert _greedy(server[1].base, prompt) == expected, prompt


def test_metrics_count_drafted_and_accepted_tokens_as_vllm_does(server: tuple[str, Server]) -> None:
    method, srv = server
    base = srv.base
    for prompt in PROMPTS:
        _greedy(base, prompt)
    text = httpx.get(base + "/metrics", timeout=30).text
    drafts = _series(text, "kiln_spec_decode_drafts_total")
    drafted = _series(text, "kiln_spec_decode_draft_tokens_total")
    accepted = _series(text, "kiln_spec_decode_accepted_tokens_total")
    assert drafts > 0
    assert accepted <= drafted <= drafts * (NGRAM["num_speculative_tokens"] if method == "ngram" else 2)
    # vLLM's own Prometheus logger saw the same steps
    assert drafted == _series(text, "vllm:spec_decode_num_draft_tokens_total")
    assert accepted == _series(text, "vllm:spec_decode_num_accepted_tokens_total")
    assert _series(text, "kiln_spec_decode_acceptance_ratio") == pytest.approx(accepted / drafted)
    if method == "ngram":  # the prompts repeat themselves and the untrained model repeats its output
        assert accepted > 0
