"""The convert stage: validate a Hugging Face checkpoint and rewrite it as clean safetensors shards.

Checks, before writing anything: a supported architecture, every expected tensor present with the shape the
config implies, no unexpected tensors, no NaN/Inf (optional). Then casts to the requested dtype, writes
shards no larger than ``max_shard_size`` with an index, and carries the tokenizer, chat template and
generation config. Pickle ``.bin`` weights are refused unless explicitly allowed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.prequantized import MAX_LISTED, FormatError, PreQuantized, check_tensors, first, identify_dir, numel
from artifacts.targets import EMBED_ARCHITECTURES
from artifacts.tensors import UnreadableError, read_headers
from build.errors import BuildError

log = logging.getLogger("kiln.build.convert")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# sentence-transformers' description of an embedding model: its modules (encoder, pooling, normalization), kept
# beside the weights so both engines pool as sentence-transformers does.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# The sentence-transformers modules kiln's engines reproduce; others (Dense projections, …) would be dropped.
ST_MODULES = ("Transformer", "Pooling", "Normalize")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json")
# Buffers some old checkpoints saved; recomputed at load.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ConvertParams:
    dtype: str
    max_shard_size: int
    check_finite: bool
    allow_pickle: bool
    quantize: str = "none"  # the build's quantize method: a pre-quantized source takes only "none"
    task: str = "generate"  # target.task
    # "transformers4": tokenizer_config.json in the form transformers 4.x reads too (artifacts/targets.py:
    # EngineTarget.transformers_4); "as-saved": copied as the source has it.
    tokenizer_format: str = "as-saved"


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Stage entry (JSON in, JSON out) used by the toolchain runner."""
    return convert(ConvertParams(**params), inputs["source"], out)


def convert(p: ConvertParams, src: Path, out: Path) -> dict[str, Any]:
    config = _read_config(src)
    pq = _identify(src, config, p.quantize)
    arch = _check_architecture(config, p.task)
    if pq is not None:
        return _copy_prequantized(p, src, out, config, arch, pq)
    modules = _sentence_transformers(src) if p.task == "embed" else []
    reader = _open_weights(src, p.allow_pickle)
    shapes = reader.shapes()
    expected, optional = _expected_shapes(src, p.task)
    _check_tensors(shapes, expected, optional)
    dtype = _resolve_dtype(p.dtype, config, reader)
    _check_tokenizer(src)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(n for n in shapes if n in expected)
    shards = _plan_shards(names, shapes, DTYPE_BYTES[dtype], p.max_shard_size)
    _write_shards(reader, shards, dtype, p.check_finite, out)
    _write_config(config, dtype, out)
    for name in [*CARRIED_FILES, *modules]:
        if (src / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, out / name)
    _tokenizer_format(out, p.tokenizer_format)
    n_params = sum(numel(shapes[n]) for n in names)
    log.info("converted %s: %d tensors, %d parameters, %s, %d shard(s)", arch, len(names), n_params, dtype, len(shards))
    return {
        "architecture": arch,
        "num_parameters": n_params,
        "dtype": dtype,
        "shards": len(shards),
        "max_position_embeddings": _max_length(src, config, p.task),
    }


def _max_length(src: Path, config: Mapping[str, Any], task: str) -> int:
    """The longest input: the config's positions; for an embedding model no more than sentence-transformers'
    ``max_seq_length`` (it truncates there, so longer inputs would give vectors it never computes)."""
    positions = int(config.get("max_position_embeddings") or 0)
    path = src / "sentence_bert_config.json"
    if task != "embed" or not path.is_file():
        return positions
    try:
        seq = int(json.loads(path.read_text()).get("max_seq_length") or 0)
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise BuildError("convert", f"{path} is not a valid sentence-transformers config: {exc}") from None
    return min(p for p in (positions, seq) if p) if positions or seq else 0


def _sentence_transformers(src: Path) -> list[str]:
    """The files of the source's sentence-transformers modules (pooling and normalization configs), refusing
    modules neither engine reproduces; [] when the source is a plain encoder (the engine's own pooling applies)."""
    path = src / "modules.json"
    if not path.is_file():
        return list(ST_FILES)
    try:
        entries = json.loads(path.read_text())
        kinds = [(str(e.get("type", "")).rpartition(".")[2], str(e.get("path", ""))) for e in entries]
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise BuildError("convert", f"{path} is not a valid sentence-transformers modules list: {exc}") from None
    unknown = [kind for kind, _ in kinds if kind not in ST_MODULES]
    if unknown:
        raise BuildError(
            "convert",
            f"{path} uses sentence-transformers modules kiln does not serve: {', '.join(unknown)}",
            key="model.source",
            fix=f"kiln serves embedding models made of {', '.join(ST_MODULES)} modules",
        )
    files = [str(f.relative_to(src)) for _, sub in kinds if sub for f in sorted((src / sub).rglob("*")) if f.is_file()]
    return [*ST_FILES, *files]


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise BuildError(
            "convert",
            f"{src} has no config.json; it is not a Hugging Face checkpoint",
            key="model.source",
            fix="point model.source at a directory holding config.json and weights",
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BuildError("convert", f"{path} is not valid JSON: {exc}", key="model.source") from exc
    if not isinstance(data, dict):
        raise BuildError("convert", f"{path} must hold a JSON object", key="model.source")
    return data


def _identify(src: Path, config: Mapping[str, Any], method: str) -> PreQuantized | None:
    """The source's quantization format (None: not quantized), refused when unknown or re-quantized."""
    try:
        pq = identify_dir(src, config)
    except FormatError as exc:
        raise BuildError("convert", f"{src}: {exc}", key="model.source", fix=exc.fix) from None
    if pq is not None and method != "none":
        raise BuildError(
            "convert",
            f"the checkpoint is already quantized ({pq.summary()}); quantizing it again with quantize={method} "
            "would compound the rounding error of both",
            key="quantize",
            fix="build it as it is with quantize=none, or start from the unquantized checkpoint",
        )
    return pq


def _check_architecture(config: Mapping[str, Any], task: str = "generate") -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    supported = EMBED_ARCHITECTURES if task == "embed" else SUPPORTED_ARCHITECTURES
    if arch in supported:
        return str(arch)
    other = "generate" if task == "embed" else "embed"
    if arch in (SUPPORTED_ARCHITECTURES if task == "embed" else EMBED_ARCHITECTURES):
        raise BuildError(
            "convert",
            f"{arch} is a {'text-generation' if other == 'generate' else 'text-embedding'} model, and this build "
            f"is for target.task={task}",
            key="target.task",
            fix=f"build it with target.task={other}",
        )
    raise BuildError(
        "convert",
        f"architecture {arch!r} is not supported for target.task={task}",
        key="model.source",
        fix=f"supported architectures: {', '.join(supported)}",
    )


def _check_tokenizer(src: Path) -> None:
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        raise BuildError(
            "convert",
            f"{src} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json or vocab.txt)",
            key="model.source",
            fix="save the tokenizer beside the weights (tokenizer.save_pretrained(dir))",
        )


class _Weights:
    """Lazy access to a checkpoint's tensors by name, from safetensors or (if allowed) pickle files."""

    def __init__(self, files: dict[str, Path], pickle: bool) -> None:
        self.files = files  # tensor name -> file
        self.pickle = pickle
        self._cache: dict[Path, Any] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for name, path in self.files.items():
            out[name] = tuple(self._get(path, name, shape_only=True))
        return out

    def dtypes(self) -> set[str]:
        return {
            str(self._get(p, n, shape_only=False).dtype).removeprefix("torch.") for n, p in list(self.files.items())[:8]
        }

    def tensor(self, name: str) -> Any:
        return self._get(self.files[name], name, shape_only=False)

    def _get(self, path: Path, name: str, *, shape_only: bool) -> Any:
        if self.pickle:
            import torch

            if path not in self._cache:
                self._cache = {path: torch.load(path, map_location="cpu", weights_only=True)}
            t = self._cache[path][name]
            return t.shape if shape_only else t
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(name).get_shape() if shape_only else f.get_tensor(name)


def _open_weights(src: Path, allow_pickle: bool) -> _Weights:
    st = sorted(src.glob("*.safetensors"))
    if st:
        return _Weights(_index(src, "model.safetensors.index.json", st, _safetensors_names), pickle=False)
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins and not allow_pickle:
        raise BuildError(
            "convert",
            f"{src} holds only pickle weights ({bins[0].name}); pickle can run arbitrary code",
            key="model.allow_pickle",
            fix="convert them to safetensors, or set model.allow_pickle=true if you trust the source",
        )
    if bins:
        return _Weights(_index(src, "pytorch_model.bin.index.json", bins, _pickle_names), pickle=True)
    raise BuildError("convert", f"{src} has no weights (*.safetensors or pytorch_model*.bin)", key="model.source")


def _index(src: Path, index_name: str, files: list[Path], names_of: Any) -> dict[str, Path]:
    index = src / index_name
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
        if missing:
            raise BuildError(
                "convert",
                f"{index_name} names missing shard(s): {', '.join(missing[:MAX_LISTED])}",
                key="model.source",
                fix="copy the complete checkpoint",
            )
        return {name: src / f for name, f in weight_map.items()}
    out: dict[str, Path] = {}
    for path in files:
        for name in names_of(path):
            out[name] = path
    return out


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise BuildError(
            "convert",
            f"{path.name} is not a readable safetensors file: {exc}",
            key="model.source",
            fix="re-download or re-save the checkpoint",
        ) from exc


def _pickle_names(path: Path) -> list[str]:
    import torch

    return list(torch.load(path, map_location="cpu", weights_only=True).keys())


def _expected_shapes(src: Path, task: str = "generate") -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Tensor names and shapes implied by the config, from the transformers model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    auto = AutoModel if task == "embed" else AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError("convert", f"config.json cannot build a model: {exc}", key="model.source") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if task == "embed":  # the [CLS] pooler head: sentence-transformers never uses it, many exports leave it out
        optional |= {k for k in expected if k.startswith("pooler.")}
    return expected, optional


def _check_tensors(
    actual: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], optional: set[str]
) -> None:
    missing = sorted(set(expected) - set(actual) - optional)
    unexpected = sorted(n for n in set(actual) - set(expected) if not n.endswith(IGNORED_TENSOR_SUFFIXES))
    wrong = sorted(
        f"{n}: checkpoint {list(actual[n])}, config implies {list(expected[n])}"
        for n in set(actual) & set(expected)
        if tuple(actual[n]) != tuple(expected[n])
    )
    problems = [f"missing tensors ({len(missing)}): {first(missing)}"] if missing else []
    problems += [f"unexpected tensors ({len(unexpected)}): {first(unexpected)}"] if unexpected else []
    problems += [f"shape mismatches ({len(wrong)}):\n    " + "\n    ".join(wrong[:MAX_LISTED])] if wrong else []
    if problems:
        raise BuildError(
            "convert",
            "checkpoint does not match its config.json:\n  " + "\n  ".join(problems),
            key="model.source",
            fix="use the config.json saved with these weights, or re-export the checkpoint",
        )


def _resolve_dtype(requested: str, config: Mapping[str, Any], reader: _Weights) -> str:
    if requested != "auto":
        return requested
    declared = str(config.get("torch_dtype") or config.get("dtype") or "")
    if declared in DTYPE_BYTES:
        return declared
    found = reader.dtypes() & set(DTYPE_BYTES)
    return sorted(found)[0] if len(found) == 1 else "bfloat16"


def _plan_shards(names: list[str], shapes: Mapping[str, tuple[int, ...]], width: int, limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = numel(shapes[name]) * width
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _shard_names(count: int) -> Iterator[str]:
    if count == 1:
        yield "model.safetensors"
        return
    for i in range(count):
        yield f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def _write_shards(reader: _Weights, shards: list[list[str]], dtype: str, check_finite: bool, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    weight_map, total = {}, 0
    for names, fname in zip(shards, _shard_names(len(shards)), strict=True):
        tensors = {}
        for name in names:
            t = reader.tensor(name)
            if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise BuildError(
                    "convert",
                    f"tensor {name} contains NaN or Inf",
                    key="model.source",
                    fix="the checkpoint is damaged; re-export it (or set convert.check_finite=false to skip the check)",
                )
            tensors[name] = t.to(target).contiguous() if t.is_floating_point() else t.contiguous()
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(config: Mapping[str, Any], dtype: str, out: Path) -> None:
    data = dict(config)
    data["torch_dtype"] = dtype
    data.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- pre-quantized sources: validated against their format, copied byte for byte -------------------------

PREQUANTIZED_FILES = ("hf_quant_config.json", "recipe.yaml", "quantize_config.json")


def _tokenizer_format(out: Path, fmt: str) -> None:
    path = out / "tokenizer_config.json"
    if fmt != "transformers4" or not path.is_file():
        return
    before = json.loads(path.read_text())
    after = portable_tokenizer_config(before)
    if after != before:
        path.write_text(json.dumps(after, indent=2, sort_keys=True) + "\n")
        log.info("tokenizer_config.json rewritten in the form transformers 4.x reads (the engine's transformers)")


def portable_tokenizer_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5's tokenizer_config.json in the form 4.x reads as well. 4.57.1 refuses the 5.x form ("Tokenizer
    class TokenizersBackend does not exist", then "'list' object has no attribute 'keys'" for extra_special_tokens);
    both 4.57.1 and 5.19.0 read the rewritten one as the same tokenizer (ids, special tokens, chat template: checked
    on the tiny model's tokenizer)."""
    out = dict(cfg)
    if out.get("tokenizer_class") == "TokenizersBackend":  # 5.x's name for a tokenizer.json-backed fast tokenizer
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    if out.get("backend") == "tokenizers":
        del out["backend"]
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):  # 4.x reads extra_special_tokens as a name -> token mapping; the list is 5.x's
        del out["extra_special_tokens"]
        known = list(out.get("additional_special_tokens") or [])
        out["additional_special_tokens"] = known + [t for t in extra if t not in known]
    return out


def _copy_prequantized(
    p: ConvertParams, src: Path, out: Path, config: Mapping[str, Any], arch: str, pq: PreQuantized
) -> dict[str, Any]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise BuildError(
            "convert",
            f"{src} holds {pq.summary()} config but no safetensors weights",
            key="model.source",
            fix="a pre-quantized checkpoint is read from safetensors only; copy its *.safetensors files",
        )
    tensors = _headers(files)
    linears, dense, optional = _unquantized_model(src)
    problems = check_tensors(
        pq, {n: t for n, t in tensors.items() if not n.endswith(IGNORED_TENSOR_SUFFIXES)}, linears, dense, optional
    )
    if problems:
        raise BuildError(
            "convert",
            f"the checkpoint does not hold what its {pq.summary()} config implies:\n  " + "\n  ".join(problems),
            key="model.source",
            fix="re-export the checkpoint with the quantizer that made it, or copy the files it is missing",
        )
    declared = str(config.get("torch_dtype") or config.get("dtype") or "auto")
    if p.dtype not in ("auto", declared):
        log.warning(
            "model.dtype=%s does not apply to a pre-quantized checkpoint: its tensors are copied as stored (%s)",
            p.dtype,
            declared,
        )
    if p.check_finite:
        _check_finite_scales(src, files)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, out / path.name)
    names = ("config.json", "model.safetensors.index.json", *CARRIED_FILES, *PREQUANTIZED_FILES)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    _tokenizer_format(out, p.tokenizer_format)
    log.info(
        "pre-quantized %s: %s, %d tensors in %d file(s), copied as stored", arch, pq.summary(), len(tensors), len(files)
    )
    return {
        "architecture": arch,
        "num_parameters": sum(numel(s) for s in dense.values()),
        "dtype": declared if declared in DTYPE_BYTES else "auto",
        "shards": len(files),
        "max_position_embeddings": int(config.get("max_position_embeddings") or 0),
        "prequantized": {"format": pq.format, "quantization": pq.quantization, "engines": list(pq.engines)},
        "target": {"quantization": pq.quantization},
        "report": {"prequantized": {"format": pq.format, "scheme": pq.describe, **pq.detail}},
    }


def _headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor, read from the files' headers."""
    try:
        return read_headers(files)
    except UnreadableError as exc:
        raise BuildError(
            "convert", f"{exc.path.name} is not a readable safetensors file: {exc.reason}", key="model.source"
        ) from None


def _unquantized_model(src: Path) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, ...]], frozenset[str]]:
    """The Linear modules (name -> (out, in)) and the tensors of the model config.json describes, unquantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the dense model: its shapes are what the format's are measured by
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError("convert", f"config.json cannot build a model: {exc}", key="model.source") from exc
    linears = {
        name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    dense = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = frozenset({"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set())
    return linears, dense, optional


def _check_finite_scales(src: Path, files: list[Path]) -> None:
    """NaN/Inf in a scale or a dense tensor poisons every output; fp8 and packed integers cannot hold either."""
    import torch
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                if t.dtype in (torch.float16, torch.bfloat16, torch.float32) and not bool(torch.isfinite(t).all()):
                    raise BuildError(
                        "convert",
                        f"tensor {name} contains NaN or Inf",
                        key="model.source",
                        fix="the checkpoint is damaged; re-export it (or set convert.check_finite=false to skip "
                        "the check)",
                    )
