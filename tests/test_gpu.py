"""On an NVIDIA GPU: the ``cuda`` key fields read off this machine, and the transformers engine serving on the GPU.

Needs only torch with CUDA and kiln's pure-Python dependencies, so it runs on a GPU machine without network access
where vLLM and TensorRT-LLM cannot be installed: ``bash tests/gpu/run.sh`` (see that script). Skipped, and
reported as skipped, where no NVIDIA GPU is visible.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from artifacts.devices import nvidia_gpus
from tests.conftest import Server, build, start_server, stop_cleanly


def _cuda_torch() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not (nvidia_gpus() and _cuda_torch()), reason="needs an NVIDIA GPU and torch with CUDA"),
]
PROMPTS = ["The grass is", "Once upon a time", "The capital of France is", "1, 2, 3,"]


def test_the_cuda_key_fields_are_this_gpus() -> None:
    """The key the compile stage records (runtime/engines/vllm/compile_cache.py: cuda_key) against torch's view."""
    import torch

    from runtime.engines.vllm.compile_cache import cuda_key

    gpus = nvidia_gpus()
    key = cuda_key(torch.version.cuda, gpus)
    major, minor = torch.cuda.get_device_capability(0)
    assert key["gpu_capability"] == f"{major}.{minor}"  # nvidia-smi's compute_cap, as torch reads it
    assert key["cuda"] == torch.version.cuda
    assert key["cuda_driver"].split(".")[0].isdigit(), key
    assert gpus[0].name == torch.cuda.get_device_name(0)
    assert gpus[0].memory_mib * 2**20 >= torch.cuda.get_device_properties(0).total_memory * 0.9


def greedy(server: Server) -> list[list[str]]:
    """Each prompt's greedy token ids (ids, not text: the random model's byte tokens may decode to nothing)."""
    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    out = client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS,
        max_tokens=8,
        temperature=0,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return [c.logprobs.tokens for c in out.choices if c.logprobs]


def test_the_transformers_engine_serves_on_the_gpu_as_on_the_cpu(tmp_path: Path) -> None:
    uri = build("model=tiny", "target.engine=transformers")
    answers, logs = {}, {}
    for device, env in {"cuda": {}, "cpu": {"CUDA_VISIBLE_DEVICES": ""}}.items():
        (tmp_path / device).mkdir()
        server = start_server(uri, tmp_path / device, "--dtype", "float32", env=env, timeout=600)
        try:
            answers[device] = greedy(server)
            logs[device] = server.logs()
        finally:
            stop_cleanly(server)
    assert "on cuda" in logs["cuda"]
    assert "on cpu" in logs["cpu"]
    # float32 on both; the GPU's kernels sum in another order, so a near-tie on the untrained model may still flip:
    # most prompts must agree exactly, and every answer has its eight tokens
    assert [len(t) for t in answers["cuda"]] == [8] * len(PROMPTS), answers
    assert sum(a == b for a, b in zip(answers["cuda"], answers["cpu"], strict=True)) >= len(PROMPTS) - 1, answers
