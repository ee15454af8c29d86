"""NVIDIA ModelOpt backend: ModelOpt HF checkpoints (``hf_quant_config.json``) for TensorRT-LLM.

Runs in the ``quantize-modelopt`` toolchain. ModelOpt's published presets, adjusted from the typed config:

* awq         INT4_AWQ_CFG (AWQ-lite scale search, symmetric int4 blocks of ``group_size``) → ``W4A16_AWQ``
* smoothquant INT8_SMOOTHQUANT_CFG (alpha = ``smoothing_strength``; int8 per-channel weights, static
              per-tensor int8 activations) → ``W8A8_SQ_PER_CHANNEL``
* fp8         FP8_DEFAULT_CFG (static per-tensor weights and activations) → ``FP8``, or, for
              ``activations=dynamic``, FP8_PER_CHANNEL_PER_TOKEN_CFG → ``FP8_PER_CHANNEL_PER_TOKEN``

Layers the preflight did not select (``quantize.ignore``, or outside ``quantize.targets``) get their
quantizers disabled. The fidelity report reads the exported files back with :func:`load_exported`, which
dequantizes each format and simulates its activation quantization, so it measures what TensorRT-LLM loads.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from quantize import preflight
from quantize.config import AwqConfig, CalibratedConfig, Fp8Config, SmoothQuantConfig
from quantize.progress import track_layers
from quantize.stage import StageParams, library_output, run_with, torch_dtype

log = logging.getLogger("kiln.quantize.modelopt")
FP8_MAX = 448.0
INT8_MAX = 127.0


def quant_config(cfg: CalibratedConfig, skipped: list[str]) -> dict[str, Any]:
    """The ModelOpt quantize config (a preset, adjusted), with every unselected layer's quantizers disabled."""
    import modelopt.torch.quantization as mtq

    if isinstance(cfg, AwqConfig):
        qc = copy.deepcopy(mtq.INT4_AWQ_CFG)
        for entry in qc["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                entry["cfg"]["block_sizes"] = {**entry["cfg"].get("block_sizes", {}), -1: cfg.group_size}
    elif isinstance(cfg, SmoothQuantConfig):
        qc = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
        qc["algorithm"] = {"method": "smoothquant", "alpha": cfg.smoothing_strength}
    else:
        assert isinstance(cfg, Fp8Config)
        preset = mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG if cfg.activations == "dynamic" else mtq.FP8_DEFAULT_CFG
        qc = copy.deepcopy(preset)
    qc["quant_cfg"] = list(qc["quant_cfg"]) + [{"quantizer_name": f"{name}.*", "enable": False} for name in skipped]
    return qc


def skipped_linears(model: Any, selected: set[str]) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in selected]


class ModelOpt:
    def quantize(self, model_dir: Path, p: StageParams, windows: list[list[int]], out: Path) -> dict[str, Any]:
        import torch

        cfg = p.config
        with library_output():
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(p.dtype)).eval()
            layers, _ = preflight.model_layers(model_dir, cfg)
            qc = quant_config(cfg, skipped_linears(model, {layer.name for layer in layers}))

            def forward_loop(m: Any) -> None:
                with track_layers(m, f"quantize {cfg.method}"):
                    for window in windows:
                        m(input_ids=torch.tensor([window]))

            with torch.inference_mode(False), torch.no_grad():
                mtq.quantize(model, qc, forward_loop)
                export_hf_checkpoint(model, export_dir=str(out))
        hf = json.loads((out / "hf_quant_config.json").read_text())
        return {"checkpoint": {"quant_method": "modelopt", "quant_algo": hf.get("quantization", {}).get("quant_algo")}}

    def load_quantized(self, out: Path) -> Any:
        return load_exported(out)

    def weights_only(self, model: Any) -> bool:
        """Turn off the input simulation; ``pre_quant_scale`` stays, it is part of the weights' math."""
        model.kiln_quantize_inputs = False
        return bool(getattr(model, "kiln_quantizes_inputs", False))


def load_exported(out: Path) -> Any:
    """A float32 Llama-style model computing with the dequantized weights of a ModelOpt HF checkpoint.

    Per quantized linear layer: weights are dequantized (int4 blocks, int8 per channel, FP8 per tensor or
    per channel), ``pre_quant_scale`` (SmoothQuant / AWQ smoothing) scales the input, and the input is
    fake-quantized the way the format says (static per-tensor ``input_scale``, or FP8 per token).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(out))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    algo = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    tensors: dict[str, Any] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors |= load_file(str(shard))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    dense = {
        k: v.float()
        for k, v in tensors.items()
        if not _is_quant_aux(k) and k.rsplit(".", 1)[0] + ".weight_scale" not in tensors
    }
    model.kiln_quantize_inputs = True  # switched off by ModelOpt.weights_only
    model.kiln_quantizes_inputs = algo != "W4A16_AWQ"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight_scale" in tensors:
            dense[f"{name}.weight"] = _dequantize(tensors, name, module, algo)
            _simulate_inputs(model, module, tensors, name, algo)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"ModelOpt checkpoint does not match its config: missing {missing}, unexpected {unexpected}")
    return model


def _is_quant_aux(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("weight_scale", "input_scale", "pre_quant_scale", "weight_scale_2")


def _dequantize(tensors: dict[str, Any], name: str, module: Any, algo: str) -> Any:
    import torch

    w, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"].float()
    out_f, in_f = module.out_features, module.in_features
    if algo == "W4A16_AWQ":
        packed = w.to(torch.uint8)  # two signed int4 per byte along the output dim, low nibble first
        low = (packed & 0x0F).to(torch.int8)
        high = ((packed >> 4) & 0x0F).to(torch.int8)
        q = torch.stack([low, high], dim=1).reshape(out_f, in_f)
        q = torch.where(q > 7, q - 16, q).float()
        block = in_f // scale.shape[1]
        return q * scale.repeat_interleave(block, dim=1)
    if scale.numel() == 1:
        return w.float() * scale.reshape(())
    return w.float() * scale.reshape(out_f, 1)


def _simulate_inputs(model: Any, module: Any, tensors: dict[str, Any], name: str, algo: str) -> None:
    pqs = tensors.get(f"{name}.pre_quant_scale")
    in_scale = tensors.get(f"{name}.input_scale")
    pqs = pqs.float() if pqs is not None else None
    in_scale = in_scale.float().reshape(()) if in_scale is not None else None

    def hook(mod: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if pqs is not None:
            x = x * pqs
        if not model.kiln_quantize_inputs:
            return (x, *args[1:])
        if algo == "W8A8_SQ_PER_CHANNEL" and in_scale is not None:
            x = (x / in_scale).round().clamp(-INT8_MAX - 1, INT8_MAX) * in_scale
        elif algo == "FP8" and in_scale is not None:
            x = _fp8(x / in_scale) * in_scale
        elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
            s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
            x = _fp8(x / s) * s
        return (x, *args[1:])

    module.register_forward_pre_hook(hook)


def _fp8(x: Any) -> Any:
    import torch

    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


run = run_with(ModelOpt())
