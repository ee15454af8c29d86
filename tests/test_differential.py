"""Differential tests: every request of ``tests/differential/matrix.yaml`` goes to kiln and to bare vLLM 0.32 (the
``vllm_pair`` fixture: same weights, same engine settings, same served name), and the two answers must agree field
by field, recursively: status code, every key and value (floats within 1e-3: both run the same engine), every chunk
of a stream in order. Ignored are only what is unique per response (``id``, ``created``, ``system_fingerprint``) and
what ``tests/differential/differences.yaml`` lists, the one place naming kiln's deliberate differences from vLLM
(each also explained in README's "Differences from vLLM").

The requests are greedy (``temperature: 0``) or seeded, and each case sends its request to both servers at the
same moment while nothing else runs on either, so both engines see the same batch and the same prefix-cache state.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, VllmPair

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent / "differential"
MATRIX = yaml.safe_load((HERE / "matrix.yaml").read_text())
DIFFERENCES: list[dict[str, Any]] = yaml.safe_load((HERE / "differences.yaml").read_text())["differences"] or []
CASES: list[dict[str, Any]] = MATRIX["cases"]
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"}
TOLERANCE = 1e-3
STREAM_ATTEMPTS = 4
MISSING = "<missing>"
# Unique per response, never compared: response ids, timestamps, the server build. Segment patterns ("*" is one path
# segment, "**" any number of them), matched against a body's path or, in a stream, a chunk's.
ALWAYS_IGNORED = (
    "id",
    "created",
    "system_fingerprint",
    "data.*.created",
    "data.*.permission.*.id",
    "data.*.permission.*.created",
    "choices.*.message.tool_calls.*.id",
    "choices.*.delta.tool_calls.*.id",
)


# -- comparing ----------------------------------------------------------------------------------------------------


def segments_match(pattern: str, path: str) -> bool:
    """``choices.*.text`` matches ``choices.0.text``; ``**`` matches any number of segments (none included)."""

    def go(p: list[str], s: list[str]) -> bool:
        if not p:
            return not s
        if p[0] == "**":
            return any(go(p[1:], s[i:]) for i in range(len(s) + 1))
        return bool(s) and fnmatchcase(s[0], p[0]) and go(p[1:], s[1:])

    return go(pattern.split("."), path.split("."))


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def diff(kiln: Any, vllm: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every leaf where the two differ: (path, kiln's value, vLLM's value); a key one side lacks is ``MISSING``."""
    if isinstance(kiln, dict) and isinstance(vllm, dict):
        for key in list(kiln) + [k for k in vllm if k not in kiln]:
            sub = f"{path}.{key}" if path else str(key)
            yield from diff(kiln.get(key, MISSING), vllm.get(key, MISSING), sub)
    elif isinstance(kiln, list) and isinstance(vllm, list):
        if len(kiln) != len(vllm):
            yield (f"{path}.#len" if path else "#len", len(kiln), len(vllm))
        for i, (a, b) in enumerate(zip(kiln, vllm, strict=False)):
            yield from diff(a, b, f"{path}.{i}" if path else str(i))
    elif _num(kiln) and _num(vllm):
        if not (kiln == vllm or math.isclose(kiln, vllm, rel_tol=0, abs_tol=TOLERANCE)):
            yield (path, kiln, vllm)
    elif kiln != vllm or type(kiln) is not type(vllm):
        yield (path, kiln, vllm)


@dataclass
class Answer:
    status: int
    body: Any  # parsed JSON; a stream: the list of its events' data (parsed JSON, or "[DONE]")
    stream: bool
    raw: str


def ask(base: str, case: dict[str, Any]) -> Answer:
    method = case.get("method", "POST")
    body = case.get("body")
    stream = bool(isinstance(body, dict) and body.get("stream"))
    with httpx.Client(base_url=base, timeout=120) as client:
        if method == "GET":
            r = client.get(case["route"])
            return Answer(r.status_code, _json(r.text), False, r.text)
        with client.stream("POST", case["route"], json=body) as r:
            raw = r.read().decode(errors="replace")
    if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
        return Answer(r.status_code, _json(raw), False, raw)
    events = []
    for line in raw.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else _json(data))
    return Answer(r.status_code, events, stream, raw)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return f"<not JSON: {text[:200]!r}>"


def compare(kiln: Answer, vllm: Answer) -> list[tuple[str, Any, Any]]:
    """The differences that matter: status; for errors the OpenAI error shape (keys, code), not the message;
    else the whole body, a stream chunk by chunk (paths ``stream.N.<chunk path>``, the count as ``stream.#count``)."""
    out: list[tuple[str, Any, Any]] = []
    if kiln.status != vllm.status:
        out.append(("status", kiln.status, vllm.status))
    if kiln.status >= 400 or vllm.status >= 400:
        if kiln.status >= 400 and vllm.status >= 400:
            out += [(p, a, b) for p, a, b in diff(_error_shape(kiln.body), _error_shape(vllm.body)) if p]
        return out
    if kiln.stream != vllm.stream:
        return [*out, ("stream", kiln.stream, vllm.stream)]
    if not kiln.stream:
        return out + [(p, a, b) for p, a, b in diff(kiln.body, vllm.body) if not _ignored(p)]
    if len(kiln.body) != len(vllm.body):
        out.append(("stream.#count", len(kiln.body), len(vllm.body)))
    for name, (ks, vs) in _streams(kiln.body, vllm.body).items():
        if name != "stream" and len(ks) != len(vs):
            out.append((f"{name}.#count", len(ks), len(vs)))
        for i, (a, b) in enumerate(zip(ks, vs, strict=False)):
            out += [(f"{name}.{i}.{p}" if p else f"{name}.{i}", x, y) for p, x, y in diff(a, b) if not _ignored(p)]
    return out


def _streams(kiln: list[Any], vllm: list[Any]) -> dict[str, tuple[list[Any], list[Any]]]:
    """The chunk sequences to compare. One choice: the stream as it is. Several (``n`` > 1, a prompt list): how
    the choices' chunks interleave is not deterministic even in vLLM (it merges the sequences' outputs as they
    come), so each choice's chunks are compared in order on their own (``stream[index=I].N``), then the chunks
    without choices (usage) and the end (``stream[rest].N``)."""

    def indices(events: list[Any]) -> set[int]:
        return {c.get("index", 0) for e in events if isinstance(e, dict) for c in e.get("choices") or []}

    every = indices(kiln) | indices(vllm)
    if every <= {0}:
        return {"stream": (kiln, vllm)}

    def split(events: list[Any], index: int | None) -> list[Any]:
        out = []
        for e in events:
            if not isinstance(e, dict) or not e.get("choices"):
                if index is None:
                    out.append(e)
                continue
            for c in e["choices"]:
                if c.get("index", 0) == index:
                    out.append({**e, "choices": [c]})
        return out

    groups = {f"stream[index={i}]": (split(kiln, i), split(vllm, i)) for i in sorted(every)}
    groups["stream[rest]"] = (split(kiln, None), split(vllm, None))
    return groups


def merged(events: list[Any]) -> dict[Any, Any]:
    """A stream with its chunking taken out: per choice the whole text, the logprob tokens, the finish reason;
    and the last usage."""
    out: dict[Any, Any] = {}
    for e in events:
        if not isinstance(e, dict):
            continue
        if e.get("usage"):
            out["usage"] = e["usage"]
        for c in e.get("choices") or []:
            m = out.setdefault(c.get("index", 0), {"text": "", "tokens": [], "finish_reason": None})
            m["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
            lp = c.get("logprobs") or {}
            m["tokens"] += lp.get("tokens") or [t.get("token") for t in lp.get("content") or []]
            m["finish_reason"] = c.get("finish_reason") or m["finish_reason"]
    return out


def _error_shape(body: Any) -> Any:
    if not isinstance(body, dict):
        return {"<body>": body}
    err = body.get("error")
    shape: dict[str, Any] = {"keys": sorted(body)}
    if isinstance(err, dict):
        shape.update(error_keys=sorted(err), code=err.get("code"))
    return shape


def _ignored(path: str) -> bool:
    return any(segments_match(p, path) for p in ALWAYS_IGNORED)


def applicable(case_id: str) -> list[dict[str, Any]]:
    return [d for d in DIFFERENCES if any(fnmatchcase(case_id, c) for c in d.get("cases", ["*"]))]


def allowed(entry: dict[str, Any], path: str, kiln: Any, vllm: Any) -> bool:
    """Whether a differences.yaml entry covers this difference. ``compare: ignore`` (the default) drops the field;
    ``presence`` requires both sides to have it, any value; ``null-or-absent``: kiln may omit what vLLM sends as null.
    Stream paths match with or without their ``stream.N.`` prefix."""
    inner = re.sub(r"^stream(\[[^]]*\])?\.\d+\.", "", path)
    if not any(segments_match(p, path) or segments_match(p, inner) for p in entry.get("paths", ["**"])):
        return False
    mode = entry.get("compare", "ignore")
    if mode == "ignore":
        return True
    if mode == "presence":
        return MISSING not in (kiln, vllm)
    if mode == "null-or-absent":
        return kiln == MISSING and vllm is None
    if mode == "refused":
        return path == "status" and kiln == 400 and vllm != 400
    raise AssertionError(f"differences.yaml {entry['id']}: unknown compare mode {mode!r}")


# -- the tests ----------------------------------------------------------------------------------------------------


def request_of(case: dict[str, Any], model: str) -> dict[str, Any]:
    """The case with its body completed: the served model name (unless ``no_model`` or the body names one) and the
    ``repeat`` fields (``repeat: {prompt: ["word ", 2100]}``: a text too long to write out)."""
    body = case.get("body")
    if not isinstance(body, dict):
        return case
    body = dict(body)
    for key, (text, times) in (case.get("repeat") or {}).items():
        body[key] = text * times
    if "model" not in body and not case.get("no_model"):
        body = {"model": model, **body}
    return {**case, "body": body}


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as ex:
        yield ex


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kiln_answers_as_vllm_does(case: dict[str, Any], vllm_pair: VllmPair, pool: ThreadPoolExecutor) -> None:
    case = request_of(case, vllm_pair.model)
    entries = applicable(case["id"])
    # vLLM's own chunking depends on timing (its output handler merges the engine's steps when it falls behind,
    # e.g. "...nine" in one chunk instead of a chunk per token), so a stream that differs is asked again: only a
    # difference seen in every attempt counts.
    attempts = STREAM_ATTEMPTS if isinstance(case.get("body"), dict) and case["body"].get("stream") else 1
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.5)  # let the machine settle: the servers' output handlers keep up when it is quiet
        k, v = pool.submit(ask, vllm_pair.kiln.base, case), pool.submit(ask, vllm_pair.vllm.base, case)
        kiln, vllm = k.result(), v.result()
        if "expect_status" in case:  # the matrix says what vLLM does: a wrong expectation is a harness bug
            assert vllm.status == case["expect_status"], f"vLLM answered {vllm.status}: {vllm.raw[:500]}"
        left = [(p, a, b) for p, a, b in compare(kiln, vllm) if not any(allowed(e, p, a, b) for e in entries)]
        if not left:
            return
    if left:
        lines = [f"  {p}: kiln {a!r:.160} vs vLLM {b!r:.160}" for p, a, b in left[:40]]
        more = f"\n  … {len(left) - 40} more" if len(left) > 40 else ""
        if kiln.stream and vllm.stream and merged(kiln.body) == merged(vllm.body):
            more += "\n  (merged, the streams agree: each choice's whole text, tokens and finish reason are the same)"
        pytest.fail(
            f"{case['id']}: {len(left)} difference(s) from vLLM ({case['route']}"
            + (f", in each of {attempts} attempts" if attempts > 1 else "")
            + "):\n"
            + "\n".join(lines)
            + more
            + f"\n--- kiln {kiln.status}: {kiln.raw[:600]}\n--- vLLM {vllm.status}: {vllm.raw[:600]}",
            pytrace=False,
        )


def test_matrix_is_well_formed() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    for c in CASES:
        assert c["route"] in ROUTES, c["id"]
        assert c.get("method", "POST") == "GET" or "body" in c, c["id"]
    assert len(CASES) >= 100


def test_every_difference_is_used_and_documented() -> None:
    """Each deliberate difference applies to at least one case, names its reason, and README explains it."""
    ids = [c["id"] for c in CASES]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Differences from vLLM", 1)[1] if "## Differences from vLLM" in readme else ""
    problems = []
    for entry in DIFFERENCES:
        assert {"id", "reason"} <= set(entry), entry
        if not any(fnmatchcase(i, c) for i in ids for c in entry.get("cases", ["*"])):
            problems.append(f"{entry['id']}: applies to no case of matrix.yaml")
        if f"`{entry['id']}`" not in section and entry["id"] not in section:
            problems.append(f"{entry['id']}: not in README's 'Differences from vLLM' section")
    assert not problems, "\n".join(problems)


def test_comparison_rules() -> None:
    """The comparison itself: recursive, float tolerance, missing keys, list lengths, ignores, error shapes."""
    assert list(diff({"a": [1.0, {"b": "x"}]}, {"a": [1.0005, {"b": "x"}]})) == []
    assert list(diff({"a": 1.0}, {"a": 1.01})) == [("a", 1.0, 1.01)]
    assert list(diff({"a": 1}, {"a": 1, "b": None})) == [("b", MISSING, None)]
    assert list(diff([1, 2], [1])) == [("#len", 2, 1)]
    assert list(diff({"a": True}, {"a": 1})) == [("a", True, 1)]
    assert segments_match("choices.*.text", "choices.0.text")
    assert not segments_match("choices.*.text", "choices.0.logprobs.text")
    assert segments_match("**.token_ids", "choices.0.token_ids")
    assert segments_match("**.x", "x")
    err = {"error": {"message": "m1", "type": "BadRequestError", "param": "p", "code": 400}}
    other = {"error": {"message": "m2", "type": "BadRequestError", "param": "q", "code": 400}}
    assert compare(Answer(400, err, False, ""), Answer(400, other, False, "")) == []
    assert compare(Answer(200, {"id": "a", "x": 1}, False, ""), Answer(200, {"id": "b", "x": 1}, False, "")) == []
    chunks = [{"id": "a", "choices": []}, "[DONE]"]
    assert compare(Answer(200, chunks, True, ""), Answer(200, chunks[1:], True, ""))[0] == ("stream.#count", 2, 1)
    entry = {"id": "t", "paths": ["choices.*.token_ids"], "compare": "null-or-absent"}
    assert allowed(entry, "stream.3.choices.0.token_ids", MISSING, None)
    assert allowed(entry, "stream[index=1].3.choices.0.token_ids", MISSING, None)
    two = [{"choices": [{"index": 1, "text": "b"}]}, {"choices": [{"index": 0, "text": "a"}]}, "[DONE]"]
    assert compare(Answer(200, two, True, ""), Answer(200, [two[1], two[0], two[2]], True, "")) == []
    one = [{"choices": [{"index": 0, "text": "ab", "finish_reason": "length"}]}, "[DONE]"]
    split = [
        {"choices": [{"index": 0, "text": "a"}]},
        {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]},
    ]
    assert merged(one) == merged([*split, "[DONE]"]) != merged(split[:1])
    assert not allowed(entry, "choices.0.token_ids", MISSING, [1, 2])
