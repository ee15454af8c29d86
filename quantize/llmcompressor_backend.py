"""llm-compressor backend: compressed-tensors checkpoints for vLLM (runs in the ``quantize-llmcompressor`` toolchain).

Recipes follow llm-compressor's published examples, with the scheme spelled out from the typed config
(bits, group size, symmetry) instead of a preset name:

* gptq        GPTQModifier, int weights (W4A16 by default)
* awq         AWQModifier (scale search) + QuantizationModifier, int weights (asymmetric by default)
* smoothquant SmoothQuantModifier + GPTQModifier (or round-to-nearest), int8 weights per channel and int8
              activations per token, dynamic
* fp8         QuantizationModifier, FP8 e4m3 weights per channel and activations per token (dynamic, no data),
              or per-tensor weights and calibrated per-tensor activation scales (static)

Calibration uses llm-compressor's sequential pipeline (one decoder layer at a time), with kiln's windows as
an in-memory dataset, unshuffled, so the same input gives the same checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantize.config import AwqConfig, CalibratedConfig, Fp8Config, GptqConfig, SmoothQuantConfig
from quantize.progress import track_layers
from quantize.stage import StageParams, library_output, run_with, torch_dtype

log = logging.getLogger("kiln.quantize.llmcompressor")


def weight_args(bits: int, group_size: int | None, symmetric: bool) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
    }


def scheme(cfg: CalibratedConfig) -> dict[str, Any]:
    """The compressed-tensors quantization scheme (one config group) for a kiln config."""
    if isinstance(cfg, GptqConfig):
        return {"weights": weight_args(cfg.bits, cfg.group_size, cfg.symmetric)}
    if isinstance(cfg, AwqConfig):
        return {"weights": weight_args(cfg.bits, cfg.group_size, bool(cfg.symmetric))}
    if isinstance(cfg, SmoothQuantConfig):
        return {
            "weights": weight_args(8, None, True),
            "input_activations": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "dynamic": True,
            },
        }
    assert isinstance(cfg, Fp8Config)
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    if cfg.activations == "dynamic":
        return {
            "weights": {**fp8, "strategy": "channel"},
            "input_activations": {**fp8, "strategy": "token", "dynamic": True},
        }
    return {
        "weights": {**fp8, "strategy": "tensor"},
        "input_activations": {**fp8, "strategy": "tensor", "dynamic": False, "observer": "static_minmax"},
    }


def recipe(cfg: CalibratedConfig) -> list[Any]:
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    groups = {"group_0": QuantizationScheme(targets=list(cfg.targets), **scheme(cfg))}
    common = {"config_groups": groups, "ignore": list(cfg.ignore)}
    if isinstance(cfg, GptqConfig):
        return [
            GPTQModifier(**common, dampening_frac=cfg.dampening_frac, block_size=cfg.block_size, actorder=cfg.actorder)
        ]
    if isinstance(cfg, AwqConfig):
        duo: bool | str = {"true": True, "false": False}.get(cfg.duo_scaling.lower(), "both")
        return [AWQModifier(duo_scaling=duo, n_grid=cfg.n_grid), QuantizationModifier(**common)]
    if isinstance(cfg, SmoothQuantConfig):
        smooth = SmoothQuantModifier(smoothing_strength=cfg.smoothing_strength)
        if cfg.weights == "rtn":
            return [smooth, QuantizationModifier(**common)]
        return [smooth, GPTQModifier(**common, dampening_frac=cfg.dampening_frac)]
    return [QuantizationModifier(**common)]


def needs_data(cfg: CalibratedConfig) -> bool:
    """FP8 with dynamic activations is data-free: weights are scaled from their own range."""
    return not (isinstance(cfg, Fp8Config) and cfg.activations == "dynamic")


@contextmanager
def cpu_without_pinned_memory() -> Iterator[None]:
    """Skip pinning cached activations on hosts without an accelerator, for the duration of one oneshot.

    llm-compressor 0.14.0.1's AWQ pins every cached activation before its scale search
    (``AWQModifier._apply_smoothing`` → ``IntermediatesCache.pin_memory``) and offers no option to turn that
    off; on a CPU-only torch ``Tensor.pin_memory()`` raises "Cannot access accelerator device when none is
    available". Pinned memory only speeds host-to-accelerator copies, so with no accelerator skipping it
    changes no number. The override is scoped: it is undone when the block exits, and applies only when
    torch reports no accelerator.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def load_for_quantization(model_dir: Path, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype))


def calibration_dataset(windows: list[list[int]]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})


class LlmCompressor:
    def quantize(self, model_dir: Path, p: StageParams, windows: list[list[int]], out: Path) -> dict[str, Any]:
        cfg = p.config
        with library_output():
            from llmcompressor import oneshot

            model = load_for_quantization(model_dir, p.dtype)
            data: dict[str, Any] = {}
            if needs_data(cfg):
                data = {
                    "dataset": calibration_dataset(windows),
                    "num_calibration_samples": len(windows),
                    "max_seq_length": cfg.seq_len,
                    "shuffle_calibration_samples": False,
                }
            with cpu_without_pinned_memory(), track_layers(model, f"quantize {cfg.method}"):
                oneshot(model=model, recipe=recipe(cfg), **data)
            model.save_pretrained(str(out), save_compressed=True)
        qc = _quantization_config(out)
        return {"checkpoint": {"quant_method": qc.get("quant_method"), "format": qc.get("format")}}

    def load_quantized(self, out: Path) -> Any:
        """Load with transformers' compressed-tensors reader, weights dequantized; W8A8/FP8 keep their
        activation fake-quantization, so activation rounding is part of the measured error."""
        import torch
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        return model.eval()

    def weights_only(self, model: Any) -> bool:
        """The weights are already dequantized at load; with quantization off, activations pass unrounded."""
        from compressed_tensors.quantization import disable_quantization

        quantizes_inputs = any(
            getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None
            for m in model.modules()
        )
        if quantizes_inputs:
            model.apply(disable_quantization)
        return quantizes_inputs


def _quantization_config(out: Path) -> dict[str, Any]:
    import json

    data = json.loads((out / "config.json").read_text())
    qc = data.get("quantization_config") or {}
    return dict(qc)


run = run_with(LlmCompressor())
