"""``compile=neuron``: compile the model's Neuron graphs (NEFFs) with NxD Inference in the build, into the artifact.

Written for AWS Neuron SDK 2.29.0 (the ``neuron`` toolchain, ``build/toolchains/neuron.txt``): NxD Inference
(neuronx-distributed-inference) 0.9, whose API was read at aws-neuron/neuronx-distributed-inference @ 4bcdc54
(2026-07-28, ``_version.py`` 0.9.0; the "Release 2.29" commit is c63afe0): ``models/config.py`` (``NeuronConfig``
takes its options as keyword arguments and only *warns* about names it does not know, so kiln's names are held
against the ones read there by a test), ``models/application_base.py`` (``compile(path)`` writes
``neuron_config.json`` and ``model.pt``, plus ``weights/tp{rank}_sharded_checkpoint.safetensors`` with
``save_sharded_checkpoint``) and ``utils/constants.py`` (``MODEL_TYPES``: the model classes by ``model_type``).

Why NxD Inference's ``compile`` and not the vLLM Neuron plugin's CPU compile: the plugin kiln serves with,
vllm-project/vllm-neuron 0.2.0 (read at a5ef7c8, 2025-11-17, which pins vllm 0.11.0), loads a model NxD Inference
compiled from the directory named by ``NEURON_COMPILED_ARTIFACTS`` (``worker/neuronx_distributed_model_loader.py``:
``_get_compiled_model_path``, ``_load_compiled_model``), so the compiled graphs can live inside the artifact and be
verified with it. The CPU compile (``VLLM_NEURON_CPU_COMPILE=1``) belongs to the plugin's newer native route (Neuron
2.33 docs), which is not in the source read here and writes NEFFs to a remote compile cache keyed by its own hash,
not to a directory an artifact can carry. NxD Inference is in maintenance mode since Neuron 2.30 and reaches end of
support on Trn2/Trn3 at Neuron 2.34 (on Inf2/Trn1 it stays in maintenance); its graphs compile on a CPU-only host
(neuronx-cc with ``--target``), which is why the build sets ``NEURON_PLATFORM_TARGET_OVERRIDE`` to the target.

Layout: the compiled files sit at the artifact's root beside the checkpoint, because NxD Inference shards the
weights on load (without a pre-sharded checkpoint) from the directory it loads the graphs from. The neuron_config
kiln writes is the one vLLM Neuron 0.2.0 would build for the same settings (``_get_default_neuron_config``):
continuous batching over ``batch_size`` sequences, a contiguous KV cache (no prefix caching or chunked prefill),
right padding, and on-device sampling with per-request (dynamic) parameters.

NxD Inference records neither the compiler nor the SDK version, so ``target.compile`` does (a NEFF is reusable only
with the same compiler, graph, static shapes, TP degree, dtype and instance family); the runtime's ``neuron`` engine
checks it against the host before loading. This module imports only ``artifacts/`` and the standard library; NxD
Inference is imported in a child process (``python -m compile.neuron``), which gives the compile its timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from artifacts.errors import StageError
from artifacts.ops import link_tree
from compile.config import CompileConfig

NEURON_SDK = "2.29.0"  # the release build/toolchains/neuron.txt pins
REPO_ROOT = Path(__file__).resolve().parents[1]
# Chip families a NEFF is compiled for (neuronx-cc --target), by instance family: trn1n has trn1's chips.
CHIP_FAMILY = {"inf2": "inf2", "trn1": "trn1", "trn1n": "trn1", "trn2": "trn2"}
# NeuronCores of each family's largest instance (inf2.48xlarge: 12 Inferentia2 chips x 2; trn1(n).32xlarge: 16
# Trainium chips x 2; trn2.48xlarge: 16 Trainium2 chips x 8): the most a tensor-parallel group can span.
MAX_NEURON_CORES = {"inf2": 24, "trn1": 32, "trn2": 128}
# Logical NeuronCore configuration NxD Inference uses by default (models/config.py: get_platform_lnc): Trainium2
# groups two physical cores into one logical core, which is what tp_degree counts there.
DEFAULT_LNC = {"inf2": 1, "trn1": 1, "trn2": 2}
# NxD Inference's causal-LM model classes (utils/constants.py: MODEL_TYPES at 4bcdc54), by config.json model_type.
NXDI_CAUSAL_LM = (
    "gpt_oss",
    "llama",
    "llama4",
    "mllama",
    "mistral",
    "mixtral",
    "pixtral",
    "dbrx",
    "qwen2",
    "qwen2_vl",
    "qwen3",
    "qwen3_moe",
    "gemma3",
    "qwen3_vl",
)
NEURON_DTYPES = ("bfloat16", "float16", "float32")  # NeuronConfig.torch_dtype (to_torch_dtype)
# The packages whose versions the key records: the compiler, and the libraries that trace and load the graphs.
KEY_PACKAGES = {
    "neuronx_cc": "neuronx-cc",
    "nxdi": "neuronx-distributed-inference",
    "torch_neuronx": "torch-neuronx",
}


@dataclass
class NeuronCompileConfig(CompileConfig):
    """``compile=neuron``: NxD Inference compiles static-shape Neuron graphs for one instance family.

    The sequence length is ``target.max_model_len`` (default: the model's max_position_embeddings), the TP degree
    ``target.tensor_parallel_degree`` and the dtype the converted checkpoint's (``model.dtype``): each is the
    artifact's own setting, written once there."""

    backend: str = "neuron"
    # The instance family the graphs are compiled for (neuronx-cc --target): inf2, trn1 (trn1n has its chips), trn2.
    instance_family: str = "trn2"
    # Sequences decoded together (continuous batching): serving's max_num_seqs may not exceed it. LMI's Neuron
    # default max_rolling_batch_size is 32; 8 keeps the compile short and the graphs small.
    batch_size: int = 8
    max_context_length: int | None = None  # the longest prompt the context-encoding graphs take; None: the length
    # Token-generation bucket lengths, ascending, the last equal to the sequence length (context-encoding buckets
    # are those up to max_context_length). None: NxD Inference's automatic buckets.
    buckets: list[int] | None = None
    # Sample on the NeuronCores with per-request temperature, top_k (<= global_topk, 256) and top_p; logprobs,
    # penalties, min_p and seeds need host sampling (false), which returns the logits to the CPU every step.
    on_device_sampling: bool = True
    global_topk: int = 256
    # Write each rank's weights shard into the artifact (weights/tp{rank}_sharded_checkpoint.safetensors): a faster
    # load for a second copy of the weights. false: NxD Inference shards the checkpoint on every load.
    save_sharded_checkpoint: bool = True
    logical_nc_config: int | None = None  # None: the family's default (trn2: 2, else 1)
    timeout_s: int = 7200  # large models compile for an hour or more on a build host

    def problems(self, build: Any) -> list[tuple[str, str]]:
        out = []
        if build.target.engine != "neuron":
            out.append(("target.engine", f"compile=neuron compiles for the neuron engine, not {build.target.engine!r}"))
        if self.instance_family not in CHIP_FAMILY:
            out.append(("compile.instance_family", f"{self.instance_family!r} is not one of {list(CHIP_FAMILY)}"))
        for key in ("batch_size", "max_context_length", "timeout_s", "global_topk"):
            value = getattr(self, key)
            if value is not None and value < 1:
                out.append((f"compile.{key}", "must be >= 1"))
        if self.global_topk > 256:
            out.append(("compile.global_topk", "must be <= 256 (the most vLLM Neuron samples on device)"))
        if self.logical_nc_config not in (None, 1, 2):
            out.append(("compile.logical_nc_config", "must be 1 or 2"))
        elif self.logical_nc_config == 2 and self.chip() not in ("trn2", None):
            out.append(("compile.logical_nc_config", f"2 is for Trainium2; {self.instance_family} has 1"))
        out += self._tp_problems(build.target.tensor_parallel_degree)
        out += shape_problems(self, build.target.max_model_len)
        if build.serving.max_num_seqs is not None and build.serving.max_num_seqs > self.batch_size:
            out.append(
                (
                    "serving.max_num_seqs",
                    f"{build.serving.max_num_seqs} exceeds the compiled batch size: set it <= "
                    f"compile.batch_size={self.batch_size}, or raise compile.batch_size",
                )
            )
        return out

    def chip(self) -> str | None:
        return CHIP_FAMILY.get(self.instance_family)

    def lnc(self) -> int:
        return self.logical_nc_config or DEFAULT_LNC.get(self.chip() or "", 1)

    def _tp_problems(self, tp: int) -> list[tuple[str, str]]:
        chip = self.chip()
        if chip is None or tp < 1:
            return []
        most = MAX_NEURON_CORES[chip] // self.lnc()
        if tp <= most:
            return []
        return [
            (
                "target.tensor_parallel_degree",
                f"{tp} exceeds the {most} (logical) NeuronCores of the largest {self.instance_family} instance: set "
                f"target.tensor_parallel_degree <= {most}",
            )
        ]


def shape_problems(cfg: NeuronCompileConfig, seq_len: int | None) -> list[tuple[str, str]]:
    """The static shapes against the sequence length (None: not known yet, checked again by the stage)."""
    out = []
    b = cfg.buckets
    if b is not None:
        if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
            out.append(("compile.buckets", f"{list(b)} must be positive lengths in ascending order, without repeats"))
        elif seq_len is not None and b[-1] != seq_len:
            out.append(
                (
                    "compile.buckets",
                    f"the largest bucket ({b[-1]}) must be the sequence length target.max_model_len={seq_len}: "
                    "longer sequences would have no graph, and NxD Inference refuses buckets beyond it",
                )
            )
    if seq_len is not None and cfg.max_context_length is not None and cfg.max_context_length > seq_len:
        out.append(("compile.max_context_length", f"{cfg.max_context_length} exceeds target.max_model_len={seq_len}"))
    return out


@dataclass(frozen=True)
class Shapes:
    """What the graphs are compiled for, resolved from the config, the target block and the checkpoint."""

    model_type: str
    tp_degree: int
    batch_size: int
    seq_len: int
    max_context_length: int
    buckets: tuple[int, ...] | None
    dtype: str
    instance_family: str  # the chip family (CHIP_FAMILY's values)
    lnc: int
    on_device_sampling: bool
    global_topk: int
    save_sharded_checkpoint: bool
    extra: Mapping[str, Any] = field(default_factory=dict)


def resolve(cfg: NeuronCompileConfig, target: Mapping[str, Any], hf_config: Mapping[str, Any]) -> Shapes:
    """The shapes for this checkpoint; raises StageError naming the key where they cannot work."""
    seq_len = int(target["max_model_len"])
    for key, why in shape_problems(cfg, seq_len):
        raise StageError("compile", why, key=key)
    model_type = str(hf_config.get("model_type", ""))
    if model_type not in NXDI_CAUSAL_LM:
        raise StageError(
            "compile",
            f"NxD Inference has no causal-LM class for model_type {model_type!r}; it compiles {list(NXDI_CAUSAL_LM)}",
            key="compile",
            fix="use compile=none with another target.engine",
        )
    dtype = str(target["dtype"])
    if dtype == "auto":
        dtype = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16")
    if dtype not in NEURON_DTYPES:
        raise StageError("compile", f"Neuron graphs take {list(NEURON_DTYPES)}, not {dtype}", key="model.dtype")
    return Shapes(
        model_type=model_type,
        tp_degree=int(target["tensor_parallel_degree"]),
        batch_size=cfg.batch_size,
        seq_len=seq_len,
        max_context_length=cfg.max_context_length or seq_len,
        buckets=tuple(cfg.buckets) if cfg.buckets else None,
        dtype=dtype,
        instance_family=cfg.chip() or cfg.instance_family,
        lnc=cfg.lnc(),
        on_device_sampling=cfg.on_device_sampling,
        global_topk=cfg.global_topk,
        save_sharded_checkpoint=cfg.save_sharded_checkpoint,
    )


def neuron_config_kwargs(s: Shapes) -> dict[str, Any]:
    """The keyword arguments of NxD Inference's ``NeuronConfig`` for these shapes (what vLLM Neuron 0.2.0 builds for
    the same serving settings, with kiln's static shapes)."""
    kwargs: dict[str, Any] = {
        "tp_degree": s.tp_degree,
        "batch_size": s.batch_size,
        "ctx_batch_size": 1,  # one prompt encoded at a time, as vLLM Neuron's continuous-batching scheduler sends
        "max_context_length": s.max_context_length,
        "seq_len": s.seq_len,
        "torch_dtype": s.dtype,
        "is_continuous_batching": s.batch_size > 1,
        "padding_side": "right",
        "enable_bucketing": True,
        "is_block_kv_layout": False,  # contiguous KV cache: no prefix caching, no chunked prefill
        "is_prefix_caching": False,
        "quantized": False,
        "logical_nc_config": s.lnc,
        "target": s.instance_family,  # neuronx-cc --target (models/model_wrapper.py)
        "save_sharded_checkpoint": s.save_sharded_checkpoint,
    }
    if s.buckets is not None:
        ctx = [b for b in s.buckets if b < s.max_context_length] + [s.max_context_length]
        kwargs |= {"context_encoding_buckets": ctx, "token_generation_buckets": list(s.buckets)}
    if s.on_device_sampling:
        kwargs["on_device_sampling_config"] = {"dynamic": True, "deterministic": False, "global_topk": s.global_topk}
    return kwargs | dict(s.extra)


def compile_key(s: Shapes, versions: Mapping[str, str]) -> dict[str, str]:
    """``target.compile``: what the graphs are tied to (checked by runtime/engines/neuron against the host)."""
    return {
        "device": "neuron",
        "neuron_sdk": NEURON_SDK,
        **{k: versions[k] for k in KEY_PACKAGES},
        "instance_family": s.instance_family,
        "logical_nc_config": str(s.lnc),
        "tp_degree": str(s.tp_degree),
        "batch_size": str(s.batch_size),
        "seq_len": str(s.seq_len),
        "max_context_length": str(s.max_context_length),
        "buckets": ",".join(map(str, s.buckets)) if s.buckets else "auto",
        "dtype": s.dtype,
        "on_device_sampling": str(s.on_device_sampling).lower(),
        "sharded_checkpoint": str(s.save_sharded_checkpoint).lower(),
    }


def installed_versions() -> dict[str, str]:
    """The key's package versions in this interpreter; StageError naming what is missing and the fix."""
    out, missing = {}, []
    for key, dist in KEY_PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        raise StageError(
            "compile",
            f"the neuron toolchain lacks {', '.join(missing)}",
            key="compile",
            fix="create it from build/toolchains/neuron.txt (AWS's index https://pip.repos.neuron.amazonaws.com), "
            "or set KILN_TOOLCHAIN_NEURON to the python of a Neuron SDK 2.29 environment",
        )
    return out


# ---------------------------------------------------------------------------------------------- the stage


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Stage entry: link the checkpoint into ``out`` and compile its graphs there; report the key."""
    cfg = NeuronCompileConfig(**params["config"])
    model = inputs["model"]
    hf_config = json.loads((model / "config.json").read_text())
    shapes = resolve(cfg, params["target"], hf_config)
    versions = installed_versions()
    link_tree(model, out)
    start = time.monotonic()
    _compile_in_child(out, shapes, cfg.timeout_s, log_path=out.parent / "neuron-compile.log")
    missing = [str(p.relative_to(out)) for p in expected_files(out, shapes) if not p.is_file()]
    if missing:
        raise StageError("compile", f"NxD Inference's compile finished without writing {missing}", key="compile")
    return {
        "target": {"compile": compile_key(shapes, versions)},
        "compile_s": round(time.monotonic() - start, 1),
    }


def expected_files(out: Path, s: Shapes) -> list[Path]:
    files = [out / "model.pt", out / "neuron_config.json"]
    if s.save_sharded_checkpoint:
        files += [out / "weights" / f"tp{rank}_sharded_checkpoint.safetensors" for rank in range(s.tp_degree)]
    return files


def _compile_in_child(out: Path, s: Shapes, timeout_s: int, log_path: Path) -> None:
    """``python -m compile.neuron SPEC``: NxD Inference's compile, with the timeout and its output in a log."""
    spec = out.parent / "neuron-compile.json"
    spec.write_text(json.dumps({"model": str(out), "model_type": s.model_type, "kwargs": neuron_config_kwargs(s)}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    # NKI kernels and neuronx-cc read the target from here on a host without Neuron devices (models/config.py)
    env["NEURON_PLATFORM_TARGET_OVERRIDE"] = s.instance_family
    env["BASE_COMPILE_WORK_DIR"] = str(out.parent / "nxd-work") + "/"  # not /tmp/nxd_model/, shared by every build
    print(f"kiln: compile: NxD Inference compiles the Neuron graphs for {s.instance_family}", file=sys.stderr)
    with open(log_path, "w") as log_file:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "compile.neuron", str(spec)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise StageError(
                "compile",
                f"NxD Inference's compile did not finish within {timeout_s}s",
                key="compile.timeout_s",
                fix="raise compile.timeout_s",
            ) from None
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise StageError(
            "compile", f"NxD Inference's compile failed (exit code {proc.returncode}):\n{tail}", key="compile"
        )


def _child(spec_path: str) -> None:
    """In the toolchain: build NxD Inference's model for the checkpoint and compile it into the same directory."""
    from neuronx_distributed_inference.utils.constants import MODEL_TYPES
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    spec = json.loads(Path(spec_path).read_text())
    model_cls = MODEL_TYPES[spec["model_type"]]["causal-lm"]
    neuron_config = model_cls.get_neuron_config_cls()(**spec["kwargs"])
    config = model_cls.get_config_cls()(neuron_config, load_config=load_pretrained_config(spec["model"]))
    model_cls(spec["model"], config).compile(spec["model"])


if __name__ == "__main__":
    _child(sys.argv[1])
