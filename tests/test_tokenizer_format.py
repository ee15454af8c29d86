"""Artifacts for engines whose own transformers is 4.x (TensorRT-LLM 1.2, the Neuron SDK 2.29) carry a
tokenizer_config.json that transformers 4.x reads, as the same tokenizer transformers 5 reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from build.stages.convert import portable_tokenizer_config
from tests.conftest import build, run_cli

# What transformers 5.19 writes for the tiny model's tokenizer (its synthesized source), and the form 4.x reads.
SAVED_BY_5 = {
    "backend": "tokenizers",
    "bos_token": "<s>",
    "eos_token": "<|end|>",
    "extra_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    "model_max_length": 1073741824,
    "pad_token": "<pad>",
    "tokenizer_class": "TokenizersBackend",
    "unk_token": None,
}
READ_BY_4 = {
    "bos_token": "<s>",
    "eos_token": "<|end|>",
    "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    "model_max_length": 1073741824,
    "pad_token": "<pad>",
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": None,
}
PROBES = ["The grass is green.", "<|user|>\nhi<|end|>", "☃ é"]


@pytest.mark.unit
def test_the_5x_form_becomes_the_form_4x_reads() -> None:
    assert portable_tokenizer_config(SAVED_BY_5) == READ_BY_4
    assert portable_tokenizer_config(READ_BY_4) == READ_BY_4  # a 4.x-form config (most hub models) is kept


def pulled(uri: str, dest: Path) -> Path:
    assert run_cli("artifacts", "pull", uri, str(dest)).returncode == 0
    return dest


def tokenizer_facts(python: str, model: Path) -> dict[str, object]:
    """Ids of the probes, special token ids and the chat prompt, as ``python``'s transformers reads ``model``."""
    script = f"""
import json, sys
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1])
chat = t.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False, add_generation_prompt=True)
print(json.dumps({{"ids": [t(p)["input_ids"] for p in {PROBES!r}], "eos": t.eos_token_id, "bos": t.bos_token_id,
    "specials": t.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]), "chat": chat}}))
"""
    proc = subprocess.run([python, "-c", script, str(model)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def artifacts(tiny_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tokenizer-format")
    trt = build("target.engine=tensorrt_llm")
    return {"vllm": pulled(tiny_uri, tmp / "vllm"), "tensorrt_llm": pulled(trt, tmp / "trt")}


@pytest.mark.integration
def test_a_tensorrt_llm_artifact_carries_the_4x_form_and_reads_as_the_same_tokenizer(
    artifacts: dict[str, Path],
) -> None:
    assert json.loads((artifacts["tensorrt_llm"] / "tokenizer_config.json").read_text()) == READ_BY_4
    assert json.loads((artifacts["vllm"] / "tokenizer_config.json").read_text()) == SAVED_BY_5  # others: as saved
    assert tokenizer_facts(sys.executable, artifacts["tensorrt_llm"]) == tokenizer_facts(
        sys.executable, artifacts["vllm"]
    )


@pytest.mark.slow
@pytest.mark.integration
def test_transformers_4_reads_the_tensorrt_llm_artifact_and_not_the_5x_form(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """In a fresh venv with TensorRT-LLM 1.2's transformers pin (4.57.1; no torch: tokenizers need none)."""
    venv = tmp_path / "tf4"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "transformers==4.57.1", "jinja2"]
    subprocess.run(pip, check=True, timeout=900)
    python = str(venv / "bin" / "python")
    assert tokenizer_facts(python, artifacts["tensorrt_llm"]) == tokenizer_facts(sys.executable, artifacts["vllm"])
    refused = subprocess.run(
        [
            python,
            "-c",
            "import sys; from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(sys.argv[1])",
            str(artifacts["vllm"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0
    assert "TokenizersBackend" in refused.stderr
