"""``api_key``: with it set, every route but the probes and the metrics scrape wants ``Authorization: Bearer <key>``
(the official ``openai`` client sends it), and the key is never shown: not in ``runtime config``, not in errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import FakeServer, fake_server, run_cli

pytestmark = pytest.mark.unit
KEY = "sk-kiln-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir, f"api_key={KEY}", "enable_lora=true") as srv:
        yield srv


def test_the_openai_client_with_the_key_is_served(server: FakeServer) -> None:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY)
    out = client.completions.create(model=client.models.list().data[0].id, prompt="hello", max_tokens=3)
    assert out.usage is not None
    assert out.usage.completion_tokens == 3


@pytest.mark.parametrize("key", ["sk-wrong", ""])
def test_a_wrong_or_missing_key_is_refused_401(server: FakeServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=key or "unused", max_retries=0)
    headers = {} if key else {"Authorization": ""}  # the client always sends one; "" sends none at all
    with pytest.raises(openai.AuthenticationError) as err:
        client.with_options(default_headers=headers).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert err.value.status_code == 401
    assert KEY not in str(err.value.body)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/invocations"), ("GET", "/v1/models"), ("POST", "/tokenize"), ("GET", "/models/m/adapters")],
)
def test_every_route_that_serves_or_manages_wants_the_key(server: FakeServer, method: str, path: str) -> None:
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}} if path == "/invocations" else None
    bare = httpx.request(method, server.base + path, json=body, timeout=10)
    assert bare.status_code == 401, bare.text
    assert bare.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in bare.text
    keyed = httpx.request(method, server.base + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert keyed.status_code != 401, keyed.text


def test_probes_and_metrics_stay_open(server: FakeServer) -> None:
    for path in ("/ping", "/health", "/metrics"):
        assert httpx.get(server.base + path, timeout=10).status_code == 200, path


def test_the_key_is_never_shown(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = run_cli("runtime", "config", str(tiny_dir), env={"OPTION_API_KEY": KEY})
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("api_key"))
    assert "***" in line
    assert "env OPTION_API_KEY" in line
    assert KEY not in proc.stdout + proc.stderr
    with caplog.at_level(logging.DEBUG), fake_server(tiny_dir, env={"VLLM_API_KEY": KEY}) as srv:
        assert httpx.get(srv.base + "/v1/models", timeout=10).status_code == 401  # vLLM's variable works too
    assert KEY not in caplog.text
