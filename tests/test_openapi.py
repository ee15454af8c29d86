"""``/openapi.json`` against the server's behaviour: the schemathesis CLI generates requests from the document (valid
and invalid ones) and checks every response against it, on kiln's real server with the fake engine.

This module doubles as the schemathesis hook module of that run (``SCHEMATHESIS_HOOKS=tests.test_openapi``): a
``filter_failure`` hook drops the three kinds of failure, explained there, that the document cannot declare, and a
deserializer lets LMI's ``application/jsonlines`` streams be checked against their declared line schema. No check is
excluded; only the stateful phase is off (see ``schemathesis_run``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import schemathesis

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 384  # short generations: the fuzzer asks for up to max_model_len tokens, n at a time
BUDGET_S = 80  # the CLI's run (about 20 s on an idle machine); the server starts in about 3 s
CONTEXT_LIMIT = "maximum context length"


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but three kinds of "schema-valid request rejected", all rules of the server that JSON Schema
    cannot express, each recognised by the field the 400 names and its message:

    - a prompt (or chat) longer than ``max_model_len`` tokens: the limit is on the prompt's token count, which no
      string or array bound states (``max_tokens`` beyond ``max_model_len`` is declared, and not dropped here);
    - ``continue_final_message`` when the last message is not the assistant's (JSON Schema cannot address an
      array's last item) or without ``add_generation_prompt: false`` (declaring that too leaves schemathesis 4.32
      unable to generate chat bodies);
    - ``stream_options`` without ``stream: true`` (refused as vLLM does): one more if/then or anyOf rule in the
      request schemas leaves schemathesis 4.32 unable to generate chat and /invocations bodies at all.
    """
    if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 400:
        return True
    try:
        error = response.json()["error"]
    except Exception:
        return True
    message, param = (error.get("message"), error.get("param")) if isinstance(error, dict) else (error, None)
    if param is None and isinstance(response.json().get("param"), str):
        param = response.json()["param"]  # LMI's body: {"error", "code", "param"}
    message = str(message)
    if _adapter_state(case, param, message):
        return False
    if param in ("prompt", "messages", "inputs") and CONTEXT_LIMIT in message:
        return False
    if "stream_options can only be set" in message:
        return False
    return not (param in ("messages", "continue_final_message") and "continue_final_message" in message)


def _adapter_state(case: Any, param: Any, message: str) -> bool:
    """The adapter routes' refusals that depend on what is on disk or registered, not on the request's shape: a src
    that names no adapter kiln can load (a fuzzed string names none), vLLM's 400 for a name already loaded, and an
    update that would unpin, or pin an adapter that is not preloaded (its current flags are the defaults)."""
    path = str(getattr(case, "path", ""))
    if "adapter" not in path:
        return False
    if param in ("src", "lora_path"):
        return True
    if param == "lora_name" and "has already been loaded" in message:
        return True
    return path.endswith("/update") and ("unpinning" in message or "pin to true" in message)


@schemathesis.deserializer("application/jsonlines")
def jsonlines(ctx: Any, response: Any) -> Any:
    """LMI's stream, one JSON object per line: each line must parse; the last (the one with generated_text and
    details) is validated against the declared line schema."""
    lines = [json.loads(line) for line in response.content.decode().splitlines() if line.strip()]
    if not lines:
        raise ValueError("an empty application/jsonlines stream")
    return lines[-1]


def schemathesis_run(base: str, cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The CLI run, from ``cwd`` (it keeps a crash cache in ``.schemathesis/`` there), with this module's hooks."""
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(cli),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "all",
        "--mode",
        "all",
        "-n",
        "20",
        "--seed",
        "1",
        # One worker: hypothesis describes strategies with ast.parse, which CPython 3.11 can fail on when threads
        # race ("AST constructor recursion depth mismatch"); the run takes seconds anyway.
        "--workers",
        "1",
        # Stateful testing follows OpenAPI links between operations; kiln's are independent (no resources are
        # created, so nothing links one response to another request).
        "--phases",
        "examples,coverage,fuzzing",
        # The cross-field rules (if/then, not) make hypothesis reject some drafts; that is expected, not a problem.
        "--suppress-health-check",
        "too_slow,filter_too_much",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--no-color",
        *args,
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.test_openapi", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_schemathesis_finds_no_disagreement(tiny_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import fake_server

    # Room beyond the fuzzer's one request at a time (a request it timed out on may still run): a 503 for capacity
    # would be a server error to not_a_server_error.
    with fake_server(tiny_dir, max_model_len=MAX_LEN, job_queue_size=64) as srv:
        try:
            proc = schemathesis_run(srv.base, tmp_path, timeout=BUDGET_S)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            pytest.fail(f"schemathesis ran past {BUDGET_S}s:\n{out}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"schemathesis exited with {proc.returncode}:\n{out}"


ADAPTER_ROUTES = r"^/(models/[^/]+/)?adapters|^/v1/(un)?load_lora_adapter"


def test_schemathesis_finds_no_disagreement_on_the_adapter_routes(
    tiny_dir: Path, lora_uris: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The management routes of a LoRA server (SageMaker's, LMI's and vLLM's spellings), fuzzed the same way; an adapter
    registered at start gives the describe/update/delete routes one name that exists."""
    from tests.conftest import fake_server, run_cli

    roots = tmp_path / "adapters"
    assert run_cli("artifacts", "pull", lora_uris["lora0"], str(roots / "lora0")).returncode == 0
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # a fuzzed s3:// src fails at once, not after a timeout
    lora = ("enable_lora=true", f"adapter_roots={roots}", f"adapters=lora0={roots / 'lora0'}")
    with fake_server(tiny_dir, *lora, max_model_len=MAX_LEN) as srv:
        try:
            proc = schemathesis_run(srv.base, tmp_path, "--include-path-regex", ADAPTER_ROUTES, timeout=BUDGET_S)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            pytest.fail(f"schemathesis ran past {BUDGET_S}s:\n{out}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"schemathesis exited with {proc.returncode}:\n{out}"
    # 11: GET|POST /adapters, GET|DELETE /adapters/{name}, the same under /models/{model_name}, update, vLLM's two
    assert "Tested: 11\n" in out, out


def test_document_declares_what_the_server_does(tiny_dir: Path) -> None:
    """The declarations schemathesis relies on, checked directly (and against the live server where it is quick)."""
    import httpx
    from transformers import AutoTokenizer

    from tests.conftest import fake_server

    with fake_server(tiny_dir, max_model_len=MAX_LEN) as srv:
        doc = httpx.get(srv.base + "/openapi.json", timeout=30).json()
        served = httpx.get(srv.base + "/v1/models", timeout=30).json()["data"][0]["id"]
        allow = httpx.delete(srv.base + "/v1/chat/completions", timeout=30).headers.get("allow")
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = paths[path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
    ok = paths["/invocations"]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream", "application/jsonlines"}
    for path in ("/invocations", "/predictions/{model_name}"):
        bad = paths[path]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
        assert bad == {
            "anyOf": [{"$ref": "#/components/schemas/OpenAIError"}, {"$ref": "#/components/schemas/LmiError"}]
        }
    assert schemas["LmiError"]["properties"]["error"]["type"] == "string"
    assert schemas["ErrorInfo"]["required"] == ["message", "type", "param", "code"]
    for path, ops in paths.items():
        for method, op in ops.items():
            assert op["responses"]["405"]["headers"]["Allow"]["required"] is True, (method, path)
            assert "422" not in op["responses"], (method, path)
    assert allow == "POST"
    # Limits of the served model, and the rules the server enforces across fields.
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    ids = next(b for b in prompt if b["type"] == "array" and b["items"]["type"] == "integer")
    assert ids["minItems"] == 1
    assert ids["items"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
        - 1,  # the model's, not the tokenizer's
    }
    detok = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert detok["maximum"] == len(AutoTokenizer.from_pretrained(tiny_dir)) - 1
    assert any(b.get("minLength") == 1 for b in prompt if b["type"] == "string")  # this tokenizer adds no BOS
    max_tokens = schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens["maximum"] == MAX_LEN
    rules = schemas["ChatCompletionRequest"]["allOf"]
    assert {
        "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
    } in rules
    assert any("n" in r["if"].get("properties", {}) for r in rules)  # the fake engine refuses n > 1 when greedy
    assert paths["/predictions/{model_name}"]["post"]["parameters"][0]["schema"]["enum"] == [served]
