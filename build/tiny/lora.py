"""Synthesize a tiny, deterministic PEFT LoRA adapter for a base checkpoint (``adapter.source=kiln:tiny-lora``).

Its weights are non-zero and large next to the tiny model's (std 0.1 for both halves, alpha = 2·r), so an adapter
really changes greedy outputs; two seeds give two different adapters. Shapes come from the base's own tensors, so
the adapter fits whatever base it is made for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artifacts.adapters import CONFIG, PREFIX, WEIGHTS, base_tensors


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Stage entry: ``params`` {seed, rank, target_modules}; ``inputs["base"]`` the base checkpoint directory."""
    import numpy as np
    from safetensors.numpy import save_file

    rank, seed = int(params["rank"]), int(params["seed"])
    targets = tuple(params["target_modules"])
    base = base_tensors(inputs["base"])
    rng = np.random.default_rng(seed)
    tensors: dict[str, Any] = {}
    for name, (shape, _) in sorted(base.items()):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in targets or len(shape) != 2:
            continue
        out_f, in_f = shape
        tensors[f"{PREFIX}{module}.lora_A.weight"] = rng.normal(0, 0.1, (rank, in_f)).astype(np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = rng.normal(0, 0.1, (out_f, rank)).astype(np.float32)
    if not tensors:
        raise ValueError(f"the base has no modules named {targets}")
    save_file(tensors, str(out / WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "base_model_name_or_path": str(params.get("base_name", "")),
        "inference_mode": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"tensors": len(tensors)}
