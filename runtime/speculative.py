"""Speculative decoding: the one place its configuration becomes engine settings.

Two spellings configure it. vLLM's ``speculative_config`` (a JSON object, as ``option.speculative_config`` /
``OPTION_SPECULATIVE_CONFIG`` / ``--speculative-config``; an artifact's serving block may record one) and LMI's
draft-model names (``option.speculative_draft_model``, ``option.speculative_length``, ``option.draft_model_tp_size``),
which mean ``{"method": "draft_model", ...}``. The method must be named: vLLM took a config holding only ``model``
for a draft model in some releases and refused it in others (vllm#31883), so kiln asks for ``"method"`` always.

A draft model is a directory (relative paths are inside the model directory: a built artifact packages its draft
as ``draft/``), a kiln artifact URI or a plain ``s3://`` checkpoint, each pulled and verified like the model, and
must share the model's tokenizer (artifacts/tokenizers.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from artifacts.errors import ArtifactError
from artifacts.targets import SPECULATIVE_METHODS
from artifacts.tokenizers import tokenizer_mismatch
from runtime import engines
from runtime.config import Resolved
from runtime.engines.base import EngineSpec, Speculation

DEFAULT_LENGTH = 4  # LMI's speculative_length default (lmi-dist); vLLM has none and requires the value
KILN_KEYS = {"method", "num_speculative_tokens", "model"}
LMI_KEYS = ("speculative_draft_model", "speculative_length", "draft_model_tp_size")


def speculation(
    resolved: Resolved, model_dir: Path, spec: EngineSpec, task: str
) -> tuple[Speculation | None, list[str]]:
    """The speculative decoding the configuration asks for, checked (None: none), and every problem found."""
    raw, where, conflict = _requested(resolved)
    if conflict is not None:
        return None, [conflict]
    if raw is None:
        return None, []
    problems = _problems(raw, where, spec, task)
    if problems:
        return None, problems
    draft = None
    if raw["method"] == "draft_model":
        draft, why = _draft(str(raw["model"]), model_dir)
        if why is not None:
            return None, [f"{where}: draft model {raw['model']!r}: {why}"]
    options = {k: v for k, v in raw.items() if k not in KILN_KEYS}
    return Speculation(str(raw["method"]), int(raw["num_speculative_tokens"]), draft, options), []


def _requested(resolved: Resolved) -> tuple[dict[str, Any] | None, str, str | None]:
    """The speculative configuration as one dict, the name(s) it was set under (for messages), and a conflict
    between the two spellings. LMI's names make a draft-model config, or adjust one the artifact recorded; beside
    an operator's own ``speculative_config`` they conflict."""
    cfg = resolved.config
    base = dict(cfg.speculative_config) if cfg.speculative_config is not None else None
    where = str(resolved.origin("speculative_config"))
    lmi = {k: getattr(cfg, k) for k in LMI_KEYS if getattr(cfg, k) is not None}
    if not lmi:
        return base, where, None
    names = ", ".join(str(resolved.origin(k)) for k in lmi)
    if base is not None and resolved.origin("speculative_config").source != "artifact":
        return None, where, f"{where} and {names} both configure speculative decoding; keep one"
    if "speculative_draft_model" in lmi:
        length = (base or {}).get("num_speculative_tokens", DEFAULT_LENGTH)
        out = {"method": "draft_model", "model": lmi["speculative_draft_model"], "num_speculative_tokens": length}
    elif base is not None:
        out = base
    else:
        return None, names, f"{names}: set without option.speculative_draft_model (the draft model to use)"
    if "speculative_length" in lmi:
        out["num_speculative_tokens"] = lmi["speculative_length"]
    if "draft_model_tp_size" in lmi:
        out["draft_tensor_parallel_size"] = lmi["draft_model_tp_size"]
    return out, names, None


def _problems(raw: dict[str, Any], where: str, spec: EngineSpec, task: str) -> list[str]:
    method = raw.get("method")
    if method is None:
        if "model" in raw:
            return [
                f"{where} names a draft model ({raw['model']!r}) but no method; vLLM does not reliably infer it "
                'and refuses such a config in some releases (vllm#31883): add "method": "draft_model"'
            ]
        return [f'{where} needs "method": one of {", ".join(SPECULATIVE_METHODS)}']
    if method not in SPECULATIVE_METHODS:
        return [f"{where}: unknown method {method!r}; known: {', '.join(SPECULATIVE_METHODS)}"]
    out = []
    if task != "generate":
        out.append(f"{where}: speculative decoding is for text generation, and this model is for task={task}")
    if method not in spec.speculative_methods:
        able = [s.name for s in engines.specs() if method in s.speculative_methods]
        out.append(
            f"{where}: the {spec.name} engine does not run {method} speculative decoding"
            + (f"; engines that do: {', '.join(able)}" if able else "")
        )
    n = raw.get("num_speculative_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        out.append(
            f'{where}: "num_speculative_tokens" must be a whole number >= 1 (tokens proposed per step), got {n!r}'
        )
    if method == "ngram":
        out += _lookup_problems(raw, where)
    if method == "draft_model" and not raw.get("model"):
        out.append(f'{where}: method "draft_model" needs "model", the draft checkpoint (a directory or artifact URI)')
    if "tensor_parallel_size" in raw:
        out.append(f'{where}: "tensor_parallel_size" is not a draft setting; use "draft_tensor_parallel_size"')
    if spec.speculative_keys is not None and not out:
        unknown = sorted(set(raw) - KILN_KEYS - spec.speculative_keys())
        if unknown:
            out.append(f"{where}: unknown key(s) {unknown} for the {spec.name} engine's speculative decoding")
    return out


def _lookup_problems(raw: dict[str, Any], where: str) -> list[str]:
    """n-gram prompt lookup: the shortest and longest n-grams matched in the prompt."""
    lo, hi = raw.get("prompt_lookup_min"), raw.get("prompt_lookup_max")
    for key, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return [f'{where}: "{key}" must be a whole number >= 1, got {value!r}']
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        return [f'{where}: "prompt_lookup_min" ({lo}) must not exceed "prompt_lookup_max" ({hi})']
    return []


def _draft(ref: str, model_dir: Path) -> tuple[Path | None, str | None]:
    """The draft checkpoint as a verified local directory, or why it cannot draft for ``model_dir``."""
    from runtime.resolve import resolve

    inside = model_dir / ref
    if not Path(ref).is_absolute() and inside.is_dir():  # packaged with the model: verified with it
        why = tokenizer_mismatch(model_dir, inside)
        return (inside, None) if why is None else (None, f"it cannot draft for this model: {why}")
    try:
        found = resolve(ref)
        if found.weights is not None:  # a plain S3 checkpoint: its weights too, before the engine reads them
            found.weights.start()
            found.weights.wait()
    except (ArtifactError, OSError) as exc:  # named as the draft's problem, not a start-up traceback
        return None, str(exc)
    if found.manifest is not None and found.manifest.target.task != "generate":
        return None, f"it is a target.task={found.manifest.target.task} artifact, not a text-generation model"
    why = tokenizer_mismatch(model_dir, found.path)
    if why is not None:
        return None, f"it cannot draft for this model: {why}; a draft model must use the model's tokenizer"
    return found.path, None
