"""LoRA adapters (PEFT's on-disk format): what one holds, and whether it fits a base model.

Shared by the build (``adapter.source=…`` packages an adapter as an adapter artifact naming its base artifact's
digest) and the runtime (an adapter registered at start or through the management API is checked against the
served base before the engine sees it). It reads ``adapter_config.json`` and the safetensors headers only, never
the weights, so it needs no torch.

The base check is by tensor shapes, which makes it architecture-neutral: every LoRA pair
``base_model.model.<module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r] needs a base tensor
``<module>.weight`` of shape [out, in]. A base stored quantized (no dense ``.weight``) is checked by module name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.errors import KilnError
from artifacts.tensors import Shape, UnreadableError, read_headers

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
FILES = (CONFIG, WEIGHTS)  # what an adapter artifact holds
PREFIX = "base_model.model."


class AdapterError(KilnError):
    """An adapter that cannot be used: malformed, pickle-only, truncated, too large, or for another base."""


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter is, as an adapter artifact's manifest records it (``manifest.adapter``)."""

    peft_type: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dtype: str  # safetensors dtype of the LoRA weights (F32, BF16, F16)
    base_model: str  # adapter_config.json's base_model_name_or_path ("" when absent)
    modules: Mapping[str, tuple[Shape, Shape]]  # module path -> (lora_A shape, lora_B shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "dtype": self.dtype,
            "base_model": self.base_model,
            "modules": len(self.modules),
        }


def read_adapter(directory: Path, allow_pickle: bool = False) -> AdapterInfo:
    """Read and check a PEFT LoRA adapter directory; raises AdapterError naming what is wrong and the fix."""
    cfg = _config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (directory / p).is_file()]
        if pickles and not allow_pickle:
            raise AdapterError(
                f"{directory}: the adapter's weights are pickle ({pickles[0]}), which can run code when loaded",
                fix="convert it to adapter_model.safetensors (peft: save_pretrained(safe_serialization=True)), or "
                "allow pickle for an adapter you trust",
            )
        if pickles:
            raise AdapterError(
                f"{directory}: kiln reads only {WEIGHTS} (found {pickles[0]})",
                fix="convert the adapter to safetensors (peft: save_pretrained(safe_serialization=True))",
            )
        raise AdapterError(f"{directory}: no {WEIGHTS} (the adapter doesn't contain tensors)")
    tensors = read_header(weights)
    modules, dtypes = _pairs(tensors, weights)
    rank = _int(cfg, "r", directory)
    bad = sorted(m for m, (a, b) in modules.items() if a[0] != rank or b[1] != rank)
    if bad:
        a, b = modules[bad[0]]
        raise AdapterError(
            f"{weights}: {bad[0]} has lora_A {list(a)} / lora_B {list(b)}, not rank r={rank} as {CONFIG} says",
            fix="the adapter's files do not belong together: re-export it",
        )
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return AdapterInfo(
        peft_type=str(cfg.get("peft_type", "")).upper(),
        rank=rank,
        alpha=float(cfg.get("lora_alpha", rank)),
        target_modules=tuple(sorted(str(t) for t in targets)),
        dtype=sorted(dtypes)[0],
        base_model=str(cfg.get("base_model_name_or_path") or ""),
        modules=modules,
    )


def _config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such directory", fix="pass the directory holding adapter_config.json")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{directory}: no {CONFIG}, so this is not a PEFT adapter") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: must be a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}; kiln serves LORA adapters only")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise AdapterError(f"{path}: {key}=true adapters are not supported", fix=f"train it with {key}=false")
    return cfg


def _int(cfg: Mapping[str, Any], key: str, directory: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{directory / CONFIG}: {key} must be a positive integer, got {value!r}")
    return value


def read_header(path: Path) -> dict[str, tuple[Shape, str]]:
    """name -> (shape, dtype) from one safetensors file's header; a truncated or corrupt file raises AdapterError."""
    try:
        return read_headers([path])
    except UnreadableError as exc:
        raise AdapterError(
            f"{path}: not a readable safetensors file ({exc.reason}); it may be truncated or corrupt",
            fix="copy the adapter again",
        ) from None


def _pairs(tensors: Mapping[str, tuple[Shape, str]], path: Path) -> tuple[dict[str, tuple[Shape, Shape]], set[str]]:
    """The LoRA (A, B) shape pairs by module path, and the weights' dtypes."""
    if not tensors:
        raise AdapterError(f"{path}: the adapter doesn't contain tensors")
    halves: dict[str, dict[str, Shape]] = {}
    dtypes: set[str] = set()
    for name, (shape, dtype) in tensors.items():
        for half in ("lora_A", "lora_B"):
            marker = f".{half}."
            if marker in name and len(shape) == 2:
                module = name.split(marker)[0].removeprefix(PREFIX)
                halves.setdefault(module, {})[half] = shape
                dtypes.add(dtype)
    if not halves:
        raise AdapterError(f"{path}: holds no lora_A/lora_B weights (tensors: {', '.join(sorted(tensors)[:3])}…)")
    lonely = sorted(m for m, h in halves.items() if len(h) != 2)
    if lonely:
        raise AdapterError(f"{path}: {lonely[0]} has only one of lora_A and lora_B", fix="re-export the adapter")
    return {m: (h["lora_A"], h["lora_B"]) for m, h in halves.items()}, dtypes


def base_tensors(directory: Path) -> dict[str, tuple[Shape, str]]:
    """Every tensor of a base checkpoint directory (all its safetensors files)."""
    try:
        return read_headers(sorted(directory.glob("*.safetensors")))
    except UnreadableError as exc:
        raise AdapterError(f"the base's {exc.path.name} is not a readable safetensors file ({exc.reason})") from None


def check_base(info: AdapterInfo, base: Mapping[str, tuple[Shape, str]], base_name: str) -> None:
    """Refuse an adapter whose modules the base does not have, or whose shapes do not fit the base's."""
    for module, (a, b) in sorted(info.modules.items()):
        dense = base.get(f"{module}.weight")
        if dense is None:
            if not any(name.startswith(module + ".") for name in base):
                raise AdapterError(
                    f"the adapter targets {module}, which {base_name} does not have: it was trained for another "
                    f"model{f' ({info.base_model})' if info.base_model else ''}",
                    fix="register it with the base it was trained for",
                )
            continue  # stored quantized: its dense shape is not in the header
        shape = dense[0]
        if len(shape) == 2 and (shape[0], shape[1]) != (b[0], a[1]):
            raise AdapterError(
                f"the adapter's {module} maps {a[1]} -> {b[0]} features, but {base_name}'s is "
                f"{shape[1]} -> {shape[0]}: it was trained for another model"
                f"{f' ({info.base_model})' if info.base_model else ''}",
                fix="register it with the base it was trained for",
            )


def describe(infos: Iterable[AdapterInfo]) -> str:
    return ", ".join(f"r={i.rank} on {'/'.join(i.target_modules)}" for i in infos)
