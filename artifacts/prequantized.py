"""Pre-quantized checkpoints: which quantization format a Hugging Face checkpoint is in, what it is called in the
target vocabulary, which engines load it, and whether its tensors are what that format implies.

Shared by the build (``convert`` accepts a pre-quantized source with ``quantize=none``) and the runtime (a plain
directory or S3 prefix holding one is checked against this host before an engine starts). Pure Python: the
caller reads the tensor names, shapes and dtypes (safetensors headers) and the Linear modules' shapes.

Formats and the versions their layouts were checked against (README, "Quantize"):

- ``compressed-tensors`` (llm-compressor 0.14 / compressed-tensors 0.17-0.19): ``pack-quantized`` int4/int8
  weights, ``int-quantized`` / ``naive-quantized`` int8, ``float-quantized`` FP8;
- ``gptq`` (AutoGPTQ / GPTQModel 7.6, ``checkpoint_format`` gptq or gptq_v2): ``qweight`` [in·bits/32, out],
  ``qzeros`` [groups, out·bits/32], ``scales`` [groups, out], ``g_idx`` [in];
- ``awq`` (AutoAWQ 0.2.9 and GPTQModel 7.6, version gemm): ``qweight`` / ``qzeros`` [in or groups, out·bits/32],
  ``scales`` [groups, out];
- ``modelopt`` (NVIDIA ModelOpt 0.47, ``hf_quant_config.json``): FP8, W8A8_SQ_PER_CHANNEL, W4A16_AWQ;
- ``fp8`` (vLLM's and transformers' ``quant_method: fp8``): ``weight`` F8_E4M3 with ``weight_scale`` or, for
  block-wise scales, ``weight_scale_inv``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.targets import QUANTIZATIONS, quant_scheme

Shape = tuple[int, ...]
INTS = frozenset({"I32", "I16", "I8", "U8", "I64", "U32"})
FLOATS = frozenset({"F16", "BF16", "F32"})
FP8 = frozenset({"F8_E4M3", "F8_E4M3FN"})
Spec = tuple[frozenset[str], Any]  # (accepted dtypes, (out, in) -> shape, or None: one scale or one per output)
MAX_LISTED = 10


class FormatError(ValueError):
    """The checkpoint's quantization_config names a format or scheme kiln does not know; ``fix`` says what to do."""

    def __init__(self, message: str, fix: str) -> None:
        self.fix = fix
        super().__init__(message)


@dataclass(frozen=True)
class Layout:
    """The tensors one quantized Linear module ``m`` stores, as ``suffix -> (dtypes, shape of (out, in))``;
    ``optional`` ones may be absent."""

    tensors: Mapping[str, tuple[frozenset[str], Any]]
    optional: frozenset[str] = frozenset()
    marker: str = "weight"  # the tensor whose presence (and dtype) says the module is quantized


@dataclass(frozen=True)
class PreQuantized:
    """What a pre-quantized checkpoint is."""

    format: str  # "compressed-tensors", "gptq", "awq", "modelopt", "fp8"
    quantization: str  # target.quantization, e.g. "gptq-w4a16"
    engines: tuple[str, ...]  # target engines that load this format
    detail: Mapping[str, Any] = field(default_factory=dict)  # bits, group size, … (recorded in the manifest)
    layout: Layout | None = None
    excluded: tuple[str, ...] = ()  # module names or "re:" patterns the config leaves unquantized
    describe: str = ""

    @property
    def scheme(self) -> str:
        """The scheme suffix kernels are chosen by ("gptq-w4a16" -> "w4a16")."""
        return quant_scheme(self.quantization)

    def summary(self) -> str:
        return f"{self.describe or self.format} ({self.quantization})"


def identify(
    config: Mapping[str, Any], hf_quant_config: Mapping[str, Any] | None = None, recipe: str = ""
) -> PreQuantized | None:
    """The format of a checkpoint from its ``config.json`` (and ``hf_quant_config.json``, ``recipe.yaml`` when
    present); None when it is not quantized. Raises FormatError for a format or scheme kiln does not know."""
    qc = config.get("quantization_config")
    if hf_quant_config and (qc is None or str(qc.get("quant_method", "")).lower() == "modelopt"):
        return _modelopt(hf_quant_config)
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise FormatError("config.json's quantization_config is not an object", "re-export the checkpoint")
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(qc, recipe)
    if method == "gptq":
        return _gptq(qc)
    if method == "awq":
        return _awq(qc)
    if method == "fp8":
        return _fp8(qc)
    if method == "modelopt":
        raise FormatError(
            "config.json says quant_method modelopt but the checkpoint has no hf_quant_config.json",
            "copy hf_quant_config.json from the ModelOpt export beside config.json",
        )
    raise FormatError(
        f"quantization format {method or '(no quant_method)'!r} is not one kiln knows",
        f"kiln builds from {', '.join(KNOWN_FORMATS)} checkpoints; start from the unquantized checkpoint and use "
        "quantize=<method>, or convert it to one of those formats",
    )


KNOWN_FORMATS = ("compressed-tensors", "gptq", "awq", "modelopt", "fp8")


def identify_dir(model_dir: Path, config: Mapping[str, Any] | None = None) -> PreQuantized | None:
    """:func:`identify` for a checkpoint directory: reads ``config.json`` (unless given), ``hf_quant_config.json``
    and ``recipe.yaml`` where present. An unreadable file is a FormatError naming it."""

    def read(name: str) -> Any:
        path = model_dir / name
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path} is not readable JSON: {exc}", "re-copy the checkpoint's files") from None

    recipe = model_dir / "recipe.yaml"
    return identify(
        config if config is not None else read("config.json") or {},
        read("hf_quant_config.json"),
        recipe.read_text() if recipe.is_file() else "",
    )


def _name(method: str, scheme: str) -> str:
    name = scheme if scheme.startswith("fp8") else f"{method}-{scheme}"
    if name not in QUANTIZATIONS:
        raise FormatError(
            f"{name}: no engine kiln targets runs this scheme",
            f"kiln's quantization schemes: {', '.join(q for q in QUANTIZATIONS if q != 'none')}",
        )
    return name


def _int(qc: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for k in keys:
        if qc.get(k) is not None:
            return int(qc[k])
    if default is None:
        raise FormatError(f"quantization_config has no {keys[0]}", "re-export the checkpoint with its full config")
    return default


# -- GPTQ and AWQ (the classic int32-packed formats) ------------------------------------------------------


def _groups(group_size: int) -> Any:
    return lambda o, i: -(-i // group_size) if group_size > 0 else 1


def _gptq(qc: Mapping[str, Any]) -> PreQuantized:
    bits = _int(qc, "bits", "w_bit")
    gs = _int(qc, "group_size", "q_group_size", default=128)
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if bits not in (4, 8):
        raise FormatError(f"GPTQ with bits={bits}", "kiln serves 4- and 8-bit GPTQ; re-quantize to 4 or 8 bits")
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatError(f"GPTQ checkpoint_format {fmt!r}", "kiln reads checkpoint_format gptq and gptq_v2")
    pack = 32 // bits
    g = _groups(gs)
    layout = Layout(
        {
            "qweight": (frozenset({"I32"}), lambda o, i: (i // pack, o)),
            "qzeros": (frozenset({"I32"}), lambda o, i: (g(o, i), o // pack)),
            "scales": (FLOATS, lambda o, i: (g(o, i), o)),
            "g_idx": (frozenset({"I32"}), lambda o, i: (i,)),
            "bias": (FLOATS, lambda o, i: (o,)),
        },
        optional=frozenset({"g_idx", "bias"}),
        marker="qweight",
    )
    detail = {"bits": bits, "group_size": gs, "desc_act": bool(qc.get("desc_act")), "sym": qc.get("sym", True)}
    return PreQuantized(
        "gptq",
        _name("gptq", f"w{bits}a16"),
        ("vllm",),
        {**detail, "checkpoint_format": fmt},
        layout,
        _excluded(qc),
        f"GPTQ {bits}-bit, group size {gs}{', desc_act' if detail['desc_act'] else ''}",
    )


def _awq(qc: Mapping[str, Any]) -> PreQuantized:
    bits = _int(qc, "bits", "w_bit")
    gs = _int(qc, "group_size", "q_group_size", default=128)
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if bits != 4:
        raise FormatError(f"AWQ with bits={bits}", "kiln serves 4-bit AWQ checkpoints")
    if version != "gemm":
        raise FormatError(
            f"AWQ version {version!r}",
            "kiln reads AWQ's GEMM layout (the one vLLM loads); re-save the checkpoint with version GEMM",
        )
    pack = 32 // bits
    g = _groups(gs)
    layout = Layout(
        {
            "qweight": (frozenset({"I32"}), lambda o, i: (i, o // pack)),
            "qzeros": (frozenset({"I32"}), lambda o, i: (g(o, i), o // pack)),
            "scales": (FLOATS, lambda o, i: (g(o, i), o)),
            "bias": (FLOATS, lambda o, i: (o,)),
        },
        optional=frozenset({"bias"}),
        marker="qweight",
    )
    zp = bool(qc.get("zero_point", True))
    return PreQuantized(
        "awq",
        _name("awq", f"w{bits}a16"),
        ("vllm",),
        {"bits": bits, "group_size": gs, "zero_point": zp, "version": version},
        layout,
        _excluded(qc),
        f"AWQ {bits}-bit GEMM, group size {gs}",
    )


def _excluded(qc: Mapping[str, Any]) -> tuple[str, ...]:
    names = qc.get("modules_to_not_convert") or qc.get("ignore") or qc.get("exclude_modules") or []
    return tuple(str(n) for n in names)


# -- FP8 (quant_method fp8) -----------------------------------------------------------------------------


def _fp8(qc: Mapping[str, Any]) -> PreQuantized:
    if str(qc.get("weight_scale_semantics", "")).lower() == "inverse":
        raise FormatError(
            "GPTQModel's native FP8 (weight_scale_semantics: inverse, dequantized by dividing) is loaded by no "
            "engine kiln targets",
            "quantize the unquantized checkpoint with quantize=fp8, or use an llm-compressor FP8 checkpoint",
        )
    act = str(qc.get("activation_scheme", "dynamic")).lower()
    if act not in ("dynamic", "static"):
        raise FormatError(f"FP8 activation_scheme {act!r}", "kiln reads activation_scheme dynamic or static")
    block = qc.get("weight_block_size")
    if block:
        bo, bi = (int(b) for b in block)
        scale: tuple[str, Any] = ("weight_scale_inv", lambda o, i: (-(-o // bo), -(-i // bi)))
    else:
        scale = ("weight_scale", lambda o, i: None)  # per tensor or per channel: any of [], [1], [out], [out, 1]
    tensors: dict[str, tuple[frozenset[str], Any]] = {
        "weight": (frozenset(FP8), lambda o, i: (o, i)),
        scale[0]: (frozenset({"F32", "BF16", "F16"}), scale[1]),
        "bias": (FLOATS, lambda o, i: (o,)),
    }
    optional = {"bias"}
    if act == "static":
        tensors["input_scale"] = (frozenset({"F32", "BF16", "F16"}), lambda o, i: None)
    return PreQuantized(
        "fp8",
        _name("fp8", f"fp8-{act}"),
        ("vllm",),
        {"activation_scheme": act, "weight_block_size": list(block) if block else None},
        Layout(tensors, frozenset(optional)),
        _excluded(qc),
        f"FP8 ({act} activations{', block-wise scales' if block else ''})",
    )


# -- compressed-tensors ---------------------------------------------------------------------------------


def _compressed_tensors(qc: Mapping[str, Any], recipe: str) -> PreQuantized:
    fmt = str(qc.get("format") or "")
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
    if len(groups) != 1:
        raise FormatError(
            f"compressed-tensors with {len(groups)} config groups",
            "kiln reads compressed-tensors checkpoints with one quantization scheme (one config group)",
        )
    group = groups[0]
    w, a = group.get("weights") or {}, group.get("input_activations")
    bits, kind, strategy = int(w.get("num_bits", 0)), str(w.get("type", "")), str(w.get("strategy", ""))
    gs = int(w.get("group_size") or 0)
    sym = bool(w.get("symmetric", True))
    detail = {"compression": fmt, "weights": {"num_bits": bits, "type": kind, "strategy": strategy, "group_size": gs}}
    if fmt == "pack-quantized" and kind == "int" and bits in (4, 8) and a is None:
        method = _recipe_method(recipe, ("AWQModifier", "awq"), ("GPTQModifier", "gptq")) or "gptq"
        layout = _ct_packed(bits, strategy, gs, sym, bool(w.get("actorder")))
        scheme, describe = f"w{bits}a16", f"compressed-tensors W{bits}A16 ({strategy}{f' {gs}' if gs else ''})"
    elif fmt in ("int-quantized", "naive-quantized") and kind == "int" and bits == 8 and a is not None:
        method = "smoothquant"
        layout = _ct_dense(frozenset({"I8"}), strategy, gs, not sym, not a.get("dynamic", False))
        scheme, describe = "w8a8", "compressed-tensors W8A8 int8"
    elif fmt == "float-quantized" and kind == "float" and bits == 8:
        static = a is not None and not a.get("dynamic", False)
        if a is None:
            raise FormatError(
                "compressed-tensors FP8 weight-only (no input_activations)",
                "kiln's FP8 schemes quantize activations too: fp8-dynamic or fp8-static",
            )
        method, scheme = "fp8", "fp8-static" if static else "fp8-dynamic"
        layout = _ct_dense(frozenset(FP8), strategy, gs, False, static)
        describe = f"compressed-tensors FP8 ({'static' if static else 'dynamic'} activations)"
    else:
        raise FormatError(
            f"compressed-tensors format {fmt!r} with {bits}-bit {kind} weights"
            + (f" and {a.get('num_bits')}-bit {a.get('type')} activations" if a else ""),
            "kiln reads the compressed-tensors schemes its quantize stage writes: W4A16 and W8A16 (pack-quantized), "
            "W8A8 int8 (int-quantized), FP8 dynamic and static (float-quantized)",
        )
    engines = ("vllm", "tensorrt_llm") if scheme.startswith("fp8") else ("vllm",)
    return PreQuantized(
        "compressed-tensors",
        _name(method, scheme),
        engines,
        {**detail, "algorithm": method if recipe else "not recorded (no recipe.yaml)"},
        layout,
        _excluded(qc),
        describe,
    )


def _recipe_method(recipe: str, *pairs: tuple[str, str]) -> str | None:
    return next((method for marker, method in pairs if marker in recipe), None)


def _scale_shape(strategy: str, gs: int) -> Any:
    if strategy == "group":
        return lambda o, i: (o, -(-i // gs))
    if strategy == "channel":
        return lambda o, i: (o, 1)
    return lambda o, i: None  # tensor: [] or [1]


def _ct_packed(bits: int, strategy: str, gs: int, sym: bool, actorder: bool) -> Layout:
    pack = 32 // bits
    tensors: dict[str, tuple[frozenset[str], Any]] = {
        "weight_packed": (frozenset({"I32"}), lambda o, i: (o, -(-i // pack))),
        "weight_scale": (FLOATS, _scale_shape(strategy, gs)),
        "weight_shape": (frozenset({"I64", "I32"}), lambda o, i: (2,)),
        "weight_g_idx": (frozenset({"I32", "I64"}), lambda o, i: (i,)),
        "bias": (FLOATS, lambda o, i: (o,)),
    }
    optional = {"bias"} | ({"weight_g_idx"} if actorder else set())
    if not actorder:
        del tensors["weight_g_idx"]
    if not sym:
        scale = _scale_shape(strategy, gs)
        tensors["weight_zero_point"] = (INTS, lambda o, i: (-(-o // pack), (scale(o, i) or (o, 1))[1]))
    return Layout(tensors, frozenset(optional), marker="weight_packed")


def _ct_dense(weight: frozenset[str], strategy: str, gs: int, zero_point: bool, static: bool) -> Layout:
    scales = frozenset({"F32", "BF16", "F16"})
    tensors: dict[str, tuple[frozenset[str], Any]] = {
        "weight": (weight, lambda o, i: (o, i)),
        "weight_scale": (scales, _scale_shape(strategy, gs)),
        "bias": (FLOATS, lambda o, i: (o,)),
    }
    optional = {"bias", "input_zero_point"}
    if zero_point:
        tensors["weight_zero_point"] = (INTS, _scale_shape(strategy, gs))
    if static:
        tensors["input_scale"] = (scales, lambda o, i: None)
        tensors["input_zero_point"] = (INTS, lambda o, i: None)
    return Layout(tensors, frozenset(optional))


# -- ModelOpt -------------------------------------------------------------------------------------------

MODELOPT_ALGOS = {
    # quant_algo: (target.quantization, engines, description)
    "FP8": ("fp8-static", ("tensorrt_llm", "vllm"), "ModelOpt FP8 (static per-tensor scales)"),
    "W8A8_SQ_PER_CHANNEL": ("smoothquant-w8a8", ("tensorrt_llm",), "ModelOpt INT8 SmoothQuant"),
    "W4A16_AWQ": ("awq-w4a16", ("tensorrt_llm",), "ModelOpt INT4 AWQ"),
}


def _modelopt(hf: Mapping[str, Any]) -> PreQuantized:
    q = hf.get("quantization") or {}
    algo = str(q.get("quant_algo") or "")
    if algo not in MODELOPT_ALGOS:
        raise FormatError(
            f"ModelOpt quant_algo {algo or '(none)'!r} is not one kiln knows",
            f"kiln reads ModelOpt exports with quant_algo {', '.join(MODELOPT_ALGOS)}",
        )
    name, engines, describe = MODELOPT_ALGOS[algo]
    version = str((hf.get("producer") or {}).get("version") or "")
    scales = frozenset({"F32", "BF16", "F16"})
    tensors: dict[str, Spec]
    if algo == "FP8":
        tensors = {"weight": (frozenset(FP8), lambda o, i: (o, i)), "weight_scale": (scales, lambda o, i: None)}
        tensors["input_scale"] = (scales, lambda o, i: None)
    elif algo == "W8A8_SQ_PER_CHANNEL":
        tensors = {
            "weight": (frozenset({"I8"}), lambda o, i: (o, i)),
            "weight_scale": (scales, lambda o, i: (o,)),
            "input_scale": (scales, lambda o, i: None),
            "pre_quant_scale": (FLOATS, lambda o, i: (i,)),
        }
    else:
        gs = int(q.get("group_size") or 128)
        tensors = {
            "weight": (frozenset({"U8", "I8"}), lambda o, i: (o // 2, i)),
            "weight_scale": (scales, lambda o, i: (o, -(-i // gs))),
            "pre_quant_scale": (FLOATS, lambda o, i: (i,)),
        }
    tensors["bias"] = (FLOATS, lambda o, i: (o,))
    return PreQuantized(
        "modelopt",
        name,
        engines,
        {"quant_algo": algo, "producer_version": version, "kv_cache_quant_algo": q.get("kv_cache_quant_algo")},
        Layout(tensors, frozenset({"bias", "pre_quant_scale", "input_scale"})),
        tuple(str(m) for m in q.get("exclude_modules") or []),
        describe,
    )


# -- the tensor check -----------------------------------------------------------------------------------


def excluded(module: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``module`` is left unquantized by the config's ignore / modules_to_not_convert entries (exact names,
    ``re:`` patterns, trailing-name matches such as ``lm_head``, and ModelOpt's ``*`` globs)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], module):
                return True
        elif "*" in p:
            if re.fullmatch(re.escape(p).replace(r"\*", ".*"), module):
                return True
        elif module == p or module.endswith("." + p) or p.endswith("." + module):
            return True
    return False


def check_tensors(
    pq: PreQuantized,
    tensors: Mapping[str, tuple[Shape, str]],
    linears: Mapping[str, tuple[int, int]],
    dense: Mapping[str, Shape],
    optional: frozenset[str] = frozenset(),
) -> list[str]:
    """Every problem with the checkpoint's tensors for format ``pq`` (empty: none).

    ``tensors``: name -> (shape, safetensors dtype) of every tensor in the checkpoint; ``linears``: quantizable
    Linear module -> (out_features, in_features); ``dense``: the unquantized model's tensors -> shape, of which
    ``optional`` may be absent (a tied lm_head). A Linear module holds either its dense weight or the format's
    complete set of tensors; every other tensor is as in the unquantized model; nothing else is there.
    """
    assert pq.layout is not None
    layout = pq.layout
    problems: list[str] = []
    seen: set[str] = set()
    quantized: set[str] = set()
    for module, (o, i) in sorted(linears.items()):
        marker = tensors.get(f"{module}.{layout.marker}")
        if marker is None or marker[1] not in layout.tensors[layout.marker][0]:
            # Left dense: checked with the dense tensors below. Quantizers convert every Linear of the decoder
            # layers that the config does not exclude, so a dense one there is a damaged or mixed checkpoint.
            if ".layers." in module and not excluded(module, pq.excluded):
                problems.append(f"{module}: dense weight, but quantization_config quantizes it (not excluded)")
            continue
        quantized.add(module)
        for suffix, (dtypes, shape_of) in layout.tensors.items():
            name = f"{module}.{suffix}"
            if name not in tensors:
                if suffix not in layout.optional:
                    problems.append(f"{name}: missing ({pq.format} stores it for every quantized layer)")
                continue
            seen.add(name)
            shape, dtype = tensors[name]
            if dtype not in dtypes:
                problems.append(f"{name}: dtype {dtype}, {pq.format} stores {'/'.join(sorted(dtypes))}")
            want = shape_of(o, i)
            if want is None:
                if numel(shape) not in (1, o):
                    problems.append(f"{name}: shape {list(shape)}, expected one scale or one per output ({o})")
            elif tuple(shape) != tuple(want):
                problems.append(f"{name}: shape {list(shape)}, {_why(pq)} implies {list(want)} for ({o}, {i})")
    if not quantized:
        problems.append(
            f"no layer holds {pq.format}'s {layout.marker} tensor: the weights are not in the format config.json names"
        )
    missing = []
    for name, shape in sorted(dense.items()):
        if name.endswith(".weight") and name[: -len(".weight")] in quantized:
            continue  # replaced by the quantized tensors
        if name not in tensors:
            if name not in optional:
                missing.append(name)
            continue
        seen.add(name)
        if tuple(tensors[name][0]) != tuple(shape):
            problems.append(f"{name}: shape {list(tensors[name][0])}, config.json implies {list(shape)}")
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {first(missing)}")
    unexpected = sorted(set(tensors) - seen)
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {first(unexpected)}")
    return problems


def first(names: list[str]) -> str:
    """The first MAX_LISTED names, and how many more."""
    more = f" … and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _why(pq: PreQuantized) -> str:
    d = pq.detail
    if "bits" in d:
        return f"bits={d['bits']}, group_size={d['group_size']}"
    return pq.describe or pq.format


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
