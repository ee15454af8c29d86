"""LoRA adapters with the fake engine (kiln's own behaviour, in seconds): the adapter artifact the build makes, the
three management spellings (SageMaker, LMI, vLLM) over one registry, per-request selection (OpenAI ``model``, LMI
``adapters``, SageMaker's adapter header), every refusal naming its reason while the server keeps serving, and an
adapter unregistered mid-request draining before the engine drops it.

The fake engine's output depends on the adapter's name, so "the adapter was used" is visible in the text; the real
engine's outputs are checked in tests/test_lora_vllm.py.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeServer, fake_server, run_cli

pytestmark = pytest.mark.unit
PROMPT = "The quick brown fox"
HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


@pytest.fixture(scope="module")
def roots(lora_uris: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapters pulled into one allowed root (each a verified artifact directory)."""
    root = tmp_path_factory.mktemp("adapters")
    for name, uri in lora_uris.items():
        assert run_cli("artifacts", "pull", uri, str(root / name)).returncode == 0
    return root


@pytest.fixture(scope="module")
def server(tiny_dir: Path, roots: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir, "enable_lora=true", f"adapter_roots={roots}", f"adapters=lora0={roots / 'lora0'}") as s:
        yield s


def complete(srv: FakeServer, model: str | None = None, headers: dict[str, str] | None = None, **extra: Any) -> Any:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **({"model": model} if model else {}), **extra}
    return httpx.post(srv.base + "/v1/completions", json=body, headers=headers or {}, timeout=30)


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def lmi(srv: FakeServer, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    payload = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}, **body}
    return httpx.post(srv.base + "/invocations", json=payload, headers=headers or {}, timeout=30)


# -- the build -----------------------------------------------------------------------------------------------------


def test_the_adapter_artifact_names_its_base_digest_rank_and_modules(lora_uris: dict[str, str], tiny_uri: str) -> None:
    proc = run_cli("artifacts", "show", lora_uris["lora0"])
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)["manifest"]
    adapter = manifest["adapter"]
    assert adapter["base"]["digest"] == tiny_uri.rpartition("@")[2]
    assert (adapter["rank"], adapter["alpha"], adapter["target_modules"]) == (8, 16.0, ["q_proj", "v_proj"])
    assert adapter["dtype"] == "F32"
    assert adapter["peft_type"] == "LORA"
    assert sorted(f["path"] for f in manifest["files"]) == ["adapter_config.json", "adapter_model.safetensors"]


def test_the_build_refuses_a_pickle_adapter_and_one_for_another_model(tmp_path: Path, roots: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(roots / "lora0", pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    proc = run_cli("build", f"adapter.source={pickled}")
    assert proc.returncode == 1
    assert "adapter.source" in proc.stderr, proc.stderr
    assert "pickle" in proc.stderr, proc.stderr
    proc = run_cli("build", f"adapter.source={roots / 'narrow'}")  # made for hidden_size=128; tiny has 256
    assert proc.returncode == 1
    assert "trained for another model" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# -- per-request selection -----------------------------------------------------------------------------------------


def test_each_spelling_selects_the_same_adapter(server: FakeServer) -> None:
    base = text(complete(server))
    with_model = text(complete(server, "lora0"))
    assert with_model != base
    assert text(complete(server, headers={HEADER: "lora0"})) == with_model
    r = lmi(server, adapters="lora0")
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"] == with_model, r.text
    assert lmi(server, headers={HEADER: "lora0"}).json()["generated_text"] == with_model
    assert lmi(server, parameters={"max_new_tokens": 6, "adapters": "lora0"}).json()["generated_text"] == with_model
    assert lmi(server, adapters="").json()["generated_text"] == base
    chat = httpx.post(
        server.base + "/v1/chat/completions",
        json={"model": "lora0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=30,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "lora0", chat.text
    assert complete(server, "lora0").json()["model"] == "lora0"


def test_models_lists_the_base_and_its_adapters(server: FakeServer, roots: Path) -> None:
    data = httpx.get(server.base + "/v1/models", timeout=10).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["lora0"]["parent"] == data[0]["id"]
    assert data[0]["parent"] is None
    assert by_id["lora0"]["root"] == str(roots / "lora0")


def test_an_unknown_adapter_is_404_on_openai_and_424_on_lmi(server: FakeServer) -> None:
    r = complete(server, "nope")
    assert r.status_code == 404, r.text
    assert "nope" in r.json()["error"]["message"], r.text
    r = lmi(server, adapters="nope")
    assert r.status_code == 424, r.text
    assert "nope" in r.json()["error"], r.text
    r = lmi(server, headers={HEADER: "nope"})
    assert r.status_code == 424, r.text


# -- management ------------------------------------------------------------------------------------------------------


def test_sagemaker_register_use_unregister(server: FakeServer, roots: Path) -> None:
    r = httpx.post(server.base + "/adapters", params={"name": "sm1", "src": str(roots / "lora1")}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Adapter sm1 registered", r.text
    used = text(complete(server, headers={HEADER: "sm1"}))
    assert used != text(complete(server, "lora0"))
    r = httpx.delete(server.base + "/adapters/sm1", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Adapter sm1 unregistered", r.text
    assert complete(server, headers={HEADER: "sm1"}).status_code == 404
    assert "sm1" in server.engine.removed
    r = httpx.delete(server.base + "/adapters/sm1", timeout=30)
    assert r.status_code == 404, r.text
    assert "was not found" in r.json()["error"], r.text


def test_sagemaker_json_body_registers_too(server: FakeServer, roots: Path) -> None:
    body = {"name": "smjson", "src": str(roots / "lora1"), "preload": True, "pin": False}
    r = httpx.post(server.base + "/adapters", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert text(complete(server, "smjson"))
    assert httpx.delete(server.base + "/adapters/smjson", timeout=30).status_code == 200


def test_lmi_register_list_describe_update_unregister(server: FakeServer, roots: Path) -> None:
    model = httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]["id"]
    url = f"{server.base}/models/{model}/adapters"
    r = httpx.post(url, params={"name": "lmi1", "src": str(roots / "lora1")}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "Adapter lmi1 registered", r.text
    listed = {a["name"]: a for a in httpx.get(url, timeout=10).json()["adapters"]}
    assert listed["lmi1"]["rank"] == 8
    assert listed["lmi1"]["src"] == str(roots / "lora1")
    one = httpx.get(f"{url}/lmi1", timeout=10).json()
    assert one["digest"].startswith("sha256:")
    assert one["target_modules"] == ["q_proj", "v_proj"]
    before = lmi(server, adapters="lmi1").json()["generated_text"]
    r = httpx.post(f"{url}/lmi1/update", params={"src": str(roots / "lora0"), "pin": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "Adapter lmi1 updated", r.text
    assert httpx.get(f"{url}/lmi1", timeout=10).json()["pin"] is True
    assert lmi(server, adapters="lmi1").json()["generated_text"] == before  # the fake engine keys on the name
    r = httpx.post(f"{url}/lmi1/update", params={"pin": "false"}, timeout=30)
    assert r.status_code == 400, r.text
    assert "unpinning" in r.json()["error"], r.text
    assert httpx.delete(f"{url}/lmi1", timeout=30).status_code == 200
    assert lmi(server, adapters="lmi1").status_code == 424
    r = httpx.get(f"{server.base}/models/other/adapters", timeout=10)
    assert r.status_code == 404, r.text
    assert "other" in r.json()["error"], r.text


def test_vllm_load_and_unload(server: FakeServer, roots: Path) -> None:
    body = {"lora_name": "v1", "lora_path": str(roots / "lora1")}
    r = httpx.post(server.base + "/v1/load_lora_adapter", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'v1' added successfully.", r.text
    r = httpx.post(server.base + "/v1/load_lora_adapter", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "already been loaded. If you want to load the adapter in place" in r.json()["error"]["message"], r.text
    assert text(complete(server, "v1"))
    r = httpx.post(server.base + "/v1/unload_lora_adapter", json={"lora_name": "v1"}, timeout=30)
    assert r.status_code == 200, r.text
    assert "removed successfully" in r.text, r.text
    model = httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]["id"]
    # vLLM's words for these (vllm/entrypoints/openai/models/serving.py)
    for bad, message in [
        ({"lora_name": "v2"}, "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": model, "lora_path": "/opt/ml/x"}, f"The lora adapter '{model}' conflicts with a served base"),
    ]:
        r = httpx.post(server.base + "/v1/load_lora_adapter", json=bad, timeout=30)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]
    r = httpx.post(server.base + "/v1/unload_lora_adapter", json={}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "'lora_name' needs to be provided to unload a LoRA adapter."
    r = httpx.post(server.base + "/v1/unload_lora_adapter", json={"lora_name": "v1"}, timeout=30)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["param"] == "lora_name", r.text


def _damaged(tmp: Path, roots: Path, how: str) -> Path:
    d = tmp / how
    shutil.copytree(roots / "lora0", d)
    (d / "manifest.json").unlink()  # a plain adapter directory: its own checks, not the manifest's, must catch it
    weights = d / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    elif how == "pickle":
        weights.rename(d / "adapter_model.bin")
    elif how == "no-config":
        (d / "adapter_config.json").unlink()
    return d


@pytest.mark.parametrize(
    ("src", "reason"),
    [
        ("rank32", "greater than max_lora_rank=16"),
        ("narrow", "trained for another model"),
        ("truncated", "truncated or corrupt"),
        ("garbage", "truncated or corrupt"),
        ("pickle", "pickle"),
        ("no-config", "not a PEFT adapter"),
        ("outside", "outside the directories adapters may be loaded from"),
        ("missing", "no such directory"),
        ("s3-prefix", "must name a kiln adapter artifact"),
        ("model-artifact", "names a model artifact, not a LoRA adapter"),
    ],
)
def test_a_bad_adapter_is_refused_with_its_reason_and_serving_goes_on(
    server: FakeServer, roots: Path, tmp_path: Path, tiny_uri: str, src: str, reason: str
) -> None:
    base = text(complete(server, "lora0"))
    if src in ("rank32", "narrow", "missing"):
        path = str(roots / src)
    elif src == "outside":
        path = str(tmp_path)
    elif src == "s3-prefix":
        path = "s3://bucket/adapters/mine/"
    elif src == "model-artifact":
        path = tiny_uri
    else:
        path = str(_damaged_in_root(roots, tmp_path, src))
    r = httpx.post(server.base + "/adapters", params={"name": "bad", "src": path}, timeout=60)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"], r.text
    assert r.json()["param"] == "src", r.text
    assert complete(server, "bad").status_code == 404  # nothing half-registered
    assert text(complete(server, "lora0")) == base  # the server serves on


def _damaged_in_root(roots: Path, tmp: Path, how: str) -> Path:
    d = _damaged(tmp, roots, how)
    target = roots / f"damaged-{how}-{tmp.name}"
    shutil.move(str(d), target)
    return target


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"src": "x"}, "name and src are both required"),
        ({"name": "x"}, "name and src are both required"),
        ({"name": "x", "src": "/opt/ml/x", "preload": "false", "pin": "true"}, "preload to false and pin to true"),
        ({"name": "x", "src": "/opt/ml/x", "pin": "maybe"}, "not a boolean"),
        ({"name": "bad name", "src": "/opt/ml/x"}, "not a valid adapter name"),
    ],
)
def test_bad_management_arguments_are_400(server: FakeServer, params: dict[str, str], reason: str) -> None:
    r = httpx.post(server.base + "/adapters", params=params, timeout=30)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"], r.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": 5, "src": "/opt/ml/x"}, "name"),
        ({"name": ["a"], "src": "/opt/ml/x"}, "name"),
        ({"name": "x", "src": {"path": "/opt/ml/x"}}, "src"),
        ({"name": "x", "src": 7}, "src"),
        ({"name": "x", "src": "/opt/ml/x", "pin": [True]}, "pin"),
    ],
)
def test_a_json_field_of_the_wrong_type_is_400_naming_it(server: FakeServer, body: dict[str, Any], param: str) -> None:
    r = httpx.post(server.base + "/adapters", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == param, r.text


@pytest.mark.parametrize("src", ["/opt/ml/" + "x" * 5000, "/opt/ml/a\x00b", "x" * 300])
def test_an_unusable_src_path_is_400_naming_src(server: FakeServer, src: str) -> None:
    """A path the OS refuses to look at (too long, a NUL byte) is the client's mistake, not a 500."""
    r = httpx.post(server.base + "/adapters", json={"name": "x", "src": src}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == "src", r.text
    assert httpx.get(server.base + "/ping", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/load_lora_adapter", {"lora_name": 5, "lora_path": "/opt/ml/x"}, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": ["/opt/ml/x"]}, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/opt/ml/x", "load_inplace": [True]}, "load_inplace"),
        ("/v1/unload_lora_adapter", {"lora_name": {"a": 1}}, "lora_name"),
    ],
)
def test_vllm_routes_refuse_a_field_of_the_wrong_type(
    server: FakeServer, route: str, body: dict[str, Any], param: str
) -> None:
    """vLLM's pydantic request models refuse these (400); kiln does too rather than reading str(value)."""
    r = httpx.post(server.base + route, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert "must be" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("path", "methods"),
    [("/adapters", {"GET", "POST"}), ("/adapters/lora0", {"GET", "DELETE"})],
)
def test_405_allow_lists_every_method_of_the_path(server: FakeServer, path: str, methods: set[str]) -> None:
    """A path served by several routes (GET and POST /adapters are two) allows all their methods (RFC 9110)."""
    r = httpx.request("PUT", server.base + path, timeout=30)
    assert r.status_code == 405, r.text
    assert set(r.headers["allow"].split(", ")) == methods, r.headers


def test_an_update_with_an_empty_src_is_400_and_keeps_the_adapter(server: FakeServer) -> None:
    model = httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]["id"]
    before = httpx.get(server.base + "/adapters/lora0", timeout=30).json()
    r = httpx.post(f"{server.base}/models/{model}/adapters/lora0/update", json={"src": ""}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == "src", r.text
    assert httpx.get(server.base + "/adapters/lora0", timeout=30).json() == before


def test_registering_a_name_twice_is_409(server: FakeServer, roots: Path) -> None:
    r = httpx.post(server.base + "/adapters", params={"name": "lora0", "src": str(roots / "lora1")}, timeout=30)
    assert r.status_code == 409, r.text
    assert "already registered" in r.json()["error"], r.text


def test_unregistering_mid_request_lets_it_finish_before_the_engine_drops_it(server: FakeServer, roots: Path) -> None:
    src = str(roots / "lora1")
    assert httpx.post(server.base + "/adapters", params={"name": "drain", "src": src}, timeout=30).status_code == 200
    alone = text(complete(server, "drain", prompt="[slow] go", max_tokens=3))
    out: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: out.update(r=complete(server, "drain", prompt="[slow] go", max_tokens=8)))
    worker.start()
    time.sleep(0.5)  # the request is running (0.2 s a token)
    assert httpx.delete(server.base + "/adapters/drain", timeout=30).status_code == 200
    assert complete(server, "drain").status_code == 404  # gone for new requests at once
    assert "drain" not in server.engine.removed  # still in use by the running request
    worker.join(timeout=30)
    assert out["r"].status_code == 200, out["r"].text
    assert text(out["r"]).startswith(alone), out["r"].text
    assert server.engine.removed.count("drain") == 1


# -- off by default; engines without adapters ------------------------------------------------------------------------


def test_without_enable_lora_the_routes_say_how_to_turn_them_on(tiny_dir: Path) -> None:
    with fake_server(tiny_dir) as srv:
        for method, path in [("POST", "/adapters"), ("GET", "/models/m/adapters"), ("POST", "/v1/load_lora_adapter")]:
            r = httpx.request(method, srv.base + path, timeout=10)
            assert r.status_code == 404, (path, r.text)
            assert "enable_lora=true" in r.text, (path, r.text)


def test_sagemaker_env_names_configure_lora(tiny_dir: Path, roots: Path) -> None:
    from runtime import engines
    from runtime.app import configure

    env = {"SM_VLLM_ENABLE_LORA": "true", "SM_VLLM_MAX_LORA_RANK": "32", "SM_VLLM_MAX_LORAS": "2"}
    engines.register("fake", "tests.fake_engine")
    try:
        startup = configure({"model": str(tiny_dir), "engine": "fake"}, [], env)
    finally:
        engines.ENGINES.pop("fake", None)
    lora = startup.plan.settings.lora
    assert lora is not None
    assert (lora.max_lora_rank, lora.max_loras) == (32, 2)


def test_the_transformers_engine_refuses_enable_lora_at_start(tiny_dir: Path) -> None:
    from runtime.app import configure
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"enable_lora=true: the transformers engine does not serve LoRA"):
        configure({"model": str(tiny_dir), "engine": "transformers"}, ["enable_lora=true"], {})


def test_adapters_listed_without_enable_lora_are_refused(tiny_dir: Path) -> None:
    from runtime.app import configure
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"adapters are listed but enable_lora is false"):
        configure({"model": str(tiny_dir), "engine": "transformers"}, ["adapters=a=/opt/ml/a"], {})


def test_a_broken_startup_adapter_stops_the_start_naming_it(tiny_dir: Path, roots: Path, tmp_path: Path) -> None:
    import asyncio

    from runtime import engines
    from runtime.app import configure, load_service
    from runtime.config import ConfigError
    from runtime.metrics import Metrics

    bad = _damaged_in_root(roots, tmp_path, "truncated")
    options = ["enable_lora=true", f"adapter_roots={roots}", f"adapters=broken={bad}"]
    engines.register("fake", "tests.fake_engine")
    try:
        startup = configure({"model": str(tiny_dir), "engine": "fake"}, options, {})
        with pytest.raises(ConfigError, match=r"--option adapters: adapter 'broken' refused: .*truncated or corrupt"):
            asyncio.run(load_service(startup, Metrics(lambda: None)))
    finally:
        engines.ENGINES.pop("fake", None)


def test_vllm_on_cpu_reserves_a_slot_for_the_base_models_null_adapter(tmp_path: Path) -> None:
    from runtime.engines.base import EngineSettings, LoraSettings
    from runtime.engines.vllm.engine import engine_kwargs

    lora = LoraSettings(max_loras=2, max_lora_rank=8, max_cpu_loras=4)
    cpu = engine_kwargs(EngineSettings(model_dir=tmp_path, device="cpu", lora=lora))
    assert (cpu["enable_lora"], cpu["max_loras"], cpu["max_cpu_loras"], cpu["max_lora_rank"]) == (True, 3, 5, 8)
    gpu = engine_kwargs(EngineSettings(model_dir=tmp_path, device="cuda", lora=lora))
    assert (gpu["max_loras"], gpu["max_cpu_loras"]) == (2, 4)
    assert "enable_lora" not in engine_kwargs(EngineSettings(model_dir=tmp_path))
