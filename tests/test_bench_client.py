"""``python -m runtime bench``: the user's load client. Its parts against hand-worked figures, every schema and both
transports against kiln's real server (fake engine), SageMaker through a loopback endpoint that checks SigV4 with
botocore, and agreement with ``vllm bench serve`` on the same server and workload."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from runtime.bench import cli
from runtime.bench.apis import APIS, Lines
from runtime.bench.metrics import Outcome, summarize
from runtime.bench.runner import Schedule, arrival_times
from runtime.bench.workload import random_requests
from tests.conftest import ROOT, fake_server, free_port, start_fake_process
from tests.s3_server import AWS_ENV, SECRET_KEY
from tests.sagemaker_server import sagemaker_endpoint

pytestmark = pytest.mark.unit


def bench(*target: str, out: Path, **flags: Any) -> tuple[int, dict[str, Any]]:
    """The command's ``main`` in this process, with ``--key value`` flags from keywords (True: a bare flag); returns
    its exit status and result JSON."""
    argv = list(target)
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", *([] if value is True else [str(value)])]
    code = cli.main([*argv, "--no-progress", "--result-json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else {}


def small(tiny_dir: Path, prompts: int, input_len: int, output_len: int, **more: Any) -> dict[str, Any]:
    """A small workload's flags."""
    return dict(
        tokenizer=tiny_dir, num_prompts=prompts, random_input_len=input_len, random_output_len=output_len, **more
    )


# -- parts ----------------------------------------------------------------------------------------------------------


def test_lines_split_sse_and_json_lines_wherever_the_chunks_break() -> None:
    stream = (
        ': ping\n\ndata: {"choices": [{"text": "h\u00e9"}]}\n\nevent: x\ndata: {"usage": {"completion_tokens": 2}}\n\n'
        'data: [DONE]\n\n{"token": {"text": "a"}}\n{"token": {"text": "b"}, "details": {"generated_tokens": 2}}'
    ).encode()
    for cut in range(1, len(stream)):  # every split point, including inside the two-byte é
        lines = Lines()
        objs = [*lines.add(stream[:cut]), *lines.add(stream[cut:]), *lines.close()]
        assert [list(o)[0] for o in objs] == ["choices", "usage", "token", "token"], cut
        assert objs[0]["choices"][0]["text"] == "hé"


def test_metrics_follow_vllm_bench_serves_definitions() -> None:
    # Two requests worked by hand: TTFT 100 and 300 ms; A's 5 tokens end at 500 ms (TPOT (500-100)/4 = 100 ms),
    # B's 3 tokens at 700 ms (TPOT (700-300)/2 = 200 ms); a failed request counts only as failed.
    a = Outcome(prompt_len=10, ok=True, ttft=0.1, itl=[0.1] * 4, latency=0.5, output_tokens=5)
    b = Outcome(prompt_len=20, ok=True, ttft=0.3, itl=[0.2, 0.2], latency=0.7, output_tokens=3)
    c = Outcome(prompt_len=30, error="http 503", detail="busy")
    r = summarize([a, b, c], duration=2.0, tokenizer=None, percentiles=[50, 90], streaming=True)
    assert (r["completed"], r["failed"]) == (2, 1)
    assert (r["errors"], r["error_examples"]) == ({"http 503": 1}, {"http 503": "busy"})
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (30, 8)
    assert r["request_throughput"] == pytest.approx(1.0)
    assert r["output_throughput"] == pytest.approx(4.0)
    assert r["total_token_throughput"] == pytest.approx(19.0)
    assert r["mean_ttft_ms"] == pytest.approx(200)
    assert r["std_ttft_ms"] == pytest.approx(100)
    assert r["p90_ttft_ms"] == pytest.approx(280)  # linear between 100 and 300
    assert r["mean_tpot_ms"] == pytest.approx(150)
    assert r["median_tpot_ms"] == pytest.approx(150)
    assert r["mean_itl_ms"] == pytest.approx((0.4 + 0.4) / 6 * 1000)
    assert r["mean_e2el_ms"] == pytest.approx(600)
    whole = summarize([a, b], duration=1.0, tokenizer=None, percentiles=[99], streaming=False)
    assert whole["mean_ttft_ms"] is None
    assert whole["p99_itl_ms"] is None
    assert whole["mean_e2el_ms"] == pytest.approx(600)


def test_arrivals_are_poisson_at_the_rate_or_all_at_once() -> None:
    assert arrival_times(5, Schedule()) == [0.0] * 5
    times = arrival_times(2000, Schedule(request_rate=20.0, seed=3))
    gaps = [b - a for a, b in pairwise([0.0, *times])]
    assert all(g > 0 for g in gaps)
    assert times[-1] == pytest.approx(100.0)
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(1.0, abs=0.1)  # exponential gaps: spread equals the mean
    steady = arrival_times(2000, Schedule(request_rate=20.0, burstiness=50.0, seed=3))
    steady_gaps = [b - a for a, b in pairwise([0.0, *steady])]
    assert max(steady_gaps) < 2 * 0.05  # a large gamma shape is nearly uniform pacing


def test_random_prompts_encode_to_their_lengths(tiny_dir: Path) -> None:
    tok = cli.load_tokenizer(str(tiny_dir))
    fixed = random_requests(tok, 20, input_len=48, output_len=16, seed=1)
    assert all(len(tok.encode(r.prompt, add_special_tokens=False)) == r.prompt_len == 48 for r in fixed)
    assert {r.output_len for r in fixed} == {16}
    assert len({r.prompt for r in fixed}) == 20
    assert random_requests(tok, 20, 48, 16, seed=1) == fixed
    ranged = random_requests(tok, 50, input_len=40, output_len=20, range_ratio=0.5, seed=2)
    assert all(20 <= r.prompt_len <= 60 and 10 <= r.output_len <= 30 for r in ranged)
    assert len({r.output_len for r in ranged}) > 5


def test_bench_imports_no_engine_or_build_package() -> None:
    code = "import sys, runtime.__main__, runtime.bench.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    mods = json.loads(done.stdout.replace("'", '"'))
    assert not {"vllm", "torch", "hydra", "build", "quantize", "compile"} & set(mods)


# -- against kiln's server ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_every_schema_against_kiln(tiny_dir: Path, tmp_path: Path, api: str, stream: bool) -> None:
    with fake_server(tiny_dir, "token_delay_s=0.02") as srv:
        whole = {} if stream else {"no_stream": True}
        work = small(tiny_dir, 12, 24, 6, api=api, max_concurrency=3, ignore_eos=True, num_warmups=1, **whole)
        code, doc = bench(srv.base, out=tmp_path / "r.json", **work)
    r = doc["results"]
    assert code == 0
    assert r["completed"] == 12
    assert r["failed"] == 0
    assert r["total_output_tokens"] == 12 * 6
    assert r["total_input_tokens"] == 12 * 24
    assert doc["config"]["model"] == (None if api == "lmi" else "tiny-llama")  # OpenAI: the server's first model
    if stream:
        assert r["mean_ttft_ms"] > 0
        assert r["mean_tpot_ms"] >= 15
        assert r["mean_ttft_ms"] < r["mean_e2el_ms"]
    else:
        assert r["mean_ttft_ms"] is None
        assert r["mean_e2el_ms"] >= 6 * 20 * 0.9


def test_failures_are_counted_by_kind_and_fail_the_run(tiny_dir: Path, tmp_path: Path, capsys: Any) -> None:
    with fake_server(tiny_dir, "max_model_len=64") as srv:  # prompts of 80 tokens are refused 400
        code, doc = bench(srv.base, out=tmp_path / "r.json", **small(tiny_dir, 4, 80, 4))
    r = doc["results"]
    assert code == 1
    assert r["completed"] == 0
    assert r["errors"] == {"http 400": 4}
    assert "maximum context length is 64" in r["error_examples"]["http 400"]
    assert "http 400:" in capsys.readouterr().out
    dead = f"http://127.0.0.1:{free_port()}"
    code, doc = bench(dead, out=tmp_path / "d.json", **small(tiny_dir, 2, 8, 2, model="m"))
    assert code == 1
    assert doc["results"]["errors"] == {"connection": 2}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give either a URL or --endpoint-name"),
        (["http://x", "--endpoint-name", "e"], "give either a URL or --endpoint-name"),
        (["ftp://x"], "must start with http:// or https://"),
        (["http://x", "--percentiles", "50,abc"], "--percentiles"),
        (["http://x", "--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["http://x", "--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1)"),
        (["http://x", "--header", "Authorization"], "--header takes KEY=VALUE"),
    ],
)
def test_usage_errors_name_the_flag(tiny_dir: Path, args: list[str], message: str, capsys: Any) -> None:
    assert cli.main([*args, "--tokenizer", str(tiny_dir)]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_tokenizer_is_named(tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["http://x", "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


# -- SageMaker ------------------------------------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("stream", [True, False], ids=["response-stream", "invoke"])
def test_sagemaker_requests_are_signed_and_routed(
    tiny_dir: Path, tmp_path: Path, aws: None, stream: bool, capsys: Any
) -> None:
    with fake_server(tiny_dir, "token_delay_s=0.005") as srv, sagemaker_endpoint(srv.base) as sm:
        whole = {} if stream else {"no_stream": True}
        work = small(tiny_dir, 6, 16, 5, max_concurrency=2, ignore_eos=True, **whole)
        work.update(endpoint_name="kiln-ep", endpoint_url=sm.url, inference_component="ic-base", target_variant="blue")
        code, doc = bench(out=tmp_path / "r.json", **work)
    out = capsys.readouterr()
    r = doc["results"]
    assert code == 0
    assert r["completed"] == 6
    assert r["total_output_tokens"] == 30
    assert len(sm.seen) == 6
    assert all(s.signed for s in sm.seen)
    assert {s.streamed for s in sm.seen} == {stream}
    assert {s.endpoint for s in sm.seen} == {"kiln-ep"}
    assert {s.headers["x-amzn-sagemaker-inference-component"] for s in sm.seen} == {"ic-base"}
    assert {s.headers["x-amzn-sagemaker-target-variant"] for s in sm.seen} == {"blue"}
    assert all(s.body["parameters"]["max_new_tokens"] == 5 and s.body["inputs"] for s in sm.seen)
    assert SECRET_KEY not in out.out + out.err + (tmp_path / "r.json").read_text()


def test_sagemaker_adapter_goes_in_the_body_and_model_errors_are_counted(
    tiny_dir: Path, tmp_path: Path, aws: None
) -> None:
    with fake_server(tiny_dir) as srv, sagemaker_endpoint(srv.base) as sm:
        work = small(tiny_dir, 3, 8, 2, endpoint_name="kiln-ep", endpoint_url=sm.url, adapter="fr")
        code, doc = bench(out=tmp_path / "r.json", **work)
    r = doc["results"]
    assert all(s.body["adapters"] == "fr" for s in sm.seen)
    assert len(sm.seen) == 3
    # the server has no adapter "fr" (no LoRA): LMI answers 424, which SageMaker passes on as a ModelError
    assert code == 1
    assert r["errors"] == {"sagemaker ModelError": 3}
    assert "fr" in r["error_examples"]["sagemaker ModelError"]


@pytest.mark.parametrize("api", ["lmi", "chat"])
def test_sagemaker_endpoint_measured_like_http(tiny_dir: Path, tmp_path: Path, aws: None, api: str) -> None:
    with fake_server(tiny_dir, "token_delay_s=0.02") as srv, sagemaker_endpoint(srv.base) as sm:
        work = small(tiny_dir, 6, 16, 5, max_concurrency=2, ignore_eos=True, api=api)
        work.update(endpoint_name="kiln-ep", endpoint_url=sm.url)
        code, doc = bench(out=tmp_path / "r.json", **work)
    r = doc["results"]
    assert code == 0
    assert r["completed"] == 6
    assert r["total_output_tokens"] == 30
    assert r["mean_ttft_ms"] > 0
    assert r["mean_tpot_ms"] >= 15
    assert all(s.signed and s.streamed for s in sm.seen)


def test_sagemaker_wrong_credentials_fail_without_showing_them(
    tiny_dir: Path, tmp_path: Path, aws: None, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY + "-not-it")
    with fake_server(tiny_dir) as srv, sagemaker_endpoint(srv.base) as sm:
        work = small(tiny_dir, 3, 8, 2, endpoint_name="kiln-ep", endpoint_url=sm.url)
        code, doc = bench(out=tmp_path / "r.json", **work)
    out = capsys.readouterr()
    assert code == 1
    assert doc["results"]["errors"] == {"sagemaker InvalidSignatureException": 3}
    assert len(sm.seen) == 3
    assert not any(s.signed for s in sm.seen)
    assert SECRET_KEY not in out.out + out.err + (tmp_path / "r.json").read_text()


# -- agreement with vllm bench serve --------------------------------------------------------------------------------


@pytest.mark.integration
def test_agrees_with_vllm_bench_serve(tiny_dir: Path, tmp_path: Path) -> None:
    """Both clients, one after the other, against one kiln server (its own process, fake engine at 20 ms per token)
    on the same workload shape. Tolerance: throughput and mean TPOT within 10 %, mean TTFT within 25 % or 5 ms, the
    same request and token counts (the prompts differ: each client draws its own random tokens)."""
    from tests.bench import vllm_client

    shape = ["--num-prompts", "32", "--random-input-len", "32", "--random-output-len", "12", "--max-concurrency",
             "4", "--ignore-eos"]  # fmt: skip
    server = start_fake_process(tiny_dir, tmp_path, "--option", "token_delay_s=0.02")
    try:
        theirs = vllm_client.run(server.base, "tiny-llama", tiny_dir, *shape)
        out = tmp_path / "kiln.json"
        cmd = [sys.executable, "-m", "runtime", "bench", server.base, "--tokenizer", str(tiny_dir), *shape,
               "--result-json", str(out)]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy())
        assert done.returncode == 0, done.stdout + done.stderr
        ours = json.loads(out.read_text())["results"]
    finally:
        server.stop()
    assert (ours["completed"], ours["total_output_tokens"]) == (theirs["completed"], theirs["total_output_tokens"])
    assert (ours["completed"], ours["total_output_tokens"]) == (32, 32 * 12)
    assert abs(ours["total_input_tokens"] - theirs["total_input_tokens"]) <= 0.02 * theirs["total_input_tokens"]
    for key in ("request_throughput", "output_throughput", "mean_tpot_ms"):
        assert ours[key] == pytest.approx(theirs[key], rel=0.10), key
    assert abs(ours["mean_ttft_ms"] - theirs["mean_ttft_ms"]) <= max(0.25 * theirs["mean_ttft_ms"], 5.0)
