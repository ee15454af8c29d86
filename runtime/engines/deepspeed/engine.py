"""The DeepSpeed engine: the transformers engine with the model sharded by DeepSpeed-Inference's AutoTP.

``deepspeed.init_inference(model, tensor_parallel={"tp_size": N}, replace_with_kernel_inject=False)`` replaces the
model's linear layers in place with row/column shards whose outputs are all-reduced across the N ranks. kiln then
hands the sharded module (``InferenceEngine.module``) to transformers' continuous-batching manager, exactly as the
transformers engine does, giving the model a 1-D device mesh so the manager sizes its paged cache per rank and
runs its TP protocol: the TP driver (rank 0, this server process) owns requests and cancellations and broadcasts
them to the other ranks, which run the same batches (``worker.py``, one process per rank, started here).

Measured on a 2-core x86 CPU (AVX2, no AVX-512) with deepspeed 0.19.8, torch 2.13.0+cpu, transformers 5.19.0: TP=1
and TP=2 (gloo, DeepSpeed's shared-memory all-reduce) give the same greedy tokens as plain transformers in float32.

Forward-level InferenceEngine features (``enable_cuda_graph``) are refused: the manager calls the module, never
``InferenceEngine.forward``. Kernel injection is refused: it replaces the attention the paged cache plugs into.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

from runtime.engines.base import EngineDeadError, EngineError, EngineSettings, model_config_int
from runtime.engines.transformers.engine import DTYPES, TransformersEngine
from runtime.engines.transformers.engine import accepted_keys as transformers_keys

log = logging.getLogger("kiln.runtime.deepspeed")

# DeepSpeedInferenceConfig fields kiln sets from its own settings: name -> the kiln setting to use instead.
OWNED = {"tensor_parallel": "tensor_parallel_degree", "mp_size": "tensor_parallel_degree", "dtype": "dtype"}
# Fields whose non-default values cannot work under transformers' batching manager: name -> why.
REFUSED = {
    "replace_with_kernel_inject": "kernel injection replaces the model's attention with DeepSpeed's fused layers, "
    "which do not take transformers' paged KV cache (kiln serves AutoTP: replace_with_kernel_inject=false)",
    "use_triton": "DeepSpeed's triton kernels are part of kernel injection, which kiln does not serve",
    "enable_cuda_graph": "DeepSpeed captures CUDA graphs in InferenceEngine.forward, which kiln's batching manager "
    "does not call",
}
MASTER_ADDR = "127.0.0.1"
JOIN_TIMEOUT_S = 600.0  # ranks load the checkpoint before they meet; a large model on a slow disk takes minutes
WORKER_STOP_S = 30.0
SETTINGS_ENV = "KILN_DEEPSPEED_SETTINGS"  # the worker ranks' settings (JSON), see worker.py


def import_deepspeed() -> Any:
    try:
        # DeepSpeed's logger writes to the sys.stdout it finds at import: bind it to stderr, so that its messages
        # ("Setting accelerator to CPU" …) stay out of what kiln prints on stdout (`runtime config --json`).
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
    except ImportError as exc:
        from runtime.engines.deepspeed import INSTALL_HINT

        raise EngineError(f"the deepspeed engine needs deepspeed, which is not installed: {INSTALL_HINT}") from exc
    return deepspeed


def inference_fields() -> dict[str, str]:
    """DeepSpeedInferenceConfig's keys, each field's name and its alias, mapped to the field's name."""
    config_cls = import_deepspeed().inference.config.DeepSpeedInferenceConfig
    out: dict[str, str] = {}
    for name, f in config_cls.model_fields.items():
        out[name] = name
        if f.alias:
            out[f.alias] = name
    return out


def accepted_keys() -> set[str]:
    """Engine-native keys: init_inference's (names and aliases, e.g. LMI's ``max_tokens``) and the batching
    manager's (the transformers engine's)."""
    return set(inference_fields()) | transformers_keys()


def split_extra(extra: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(init_inference's keys, the rest: the batching manager's and the loading options)."""
    fields = inference_fields()
    ds = {k: v for k, v in extra.items() if k in fields}
    return ds, {k: v for k, v in extra.items() if k not in fields}


def inference_config(s: EngineSettings, ds_extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config`` kiln passes to ``deepspeed.init_inference`` (field names, not aliases). Raises EngineError
    naming the key when an operator's key is kiln's own setting or cannot work here."""
    fields = inference_fields()
    conf: dict[str, Any] = {
        "tensor_parallel": {"tp_size": s.tensor_parallel_degree},
        "dtype": checkpoint_dtype(s),
        "replace_with_kernel_inject": False,
    }
    if s.max_model_len:  # input plus output tokens: DeepSpeed's name for the context length
        conf["max_out_tokens"] = s.max_model_len
    for key, value in ds_extra.items():
        name = fields[key]
        if name in OWNED:
            raise EngineError(f"{key} is kiln's own setting for this engine: set {OWNED[name]} instead")
        if name in REFUSED and value:
            raise EngineError(f"{key}={value} is not supported by the deepspeed engine: {REFUSED[name]}")
        conf[name] = value
    return conf


def checkpoint_dtype(s: EngineSettings) -> str:
    """The dtype the model is loaded in (init_inference converts to its ``dtype``, float16 unless told)."""
    if s.dtype in DTYPES:
        return s.dtype
    try:
        cfg = json.loads((s.model_dir / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    except (OSError, ValueError, AttributeError):
        name = "float32"
    return name if name in DTYPES else "float32"


def check_shardable(s: EngineSettings) -> None:
    """AutoTP splits attention by heads, and the paged cache splits KV heads evenly over the ranks."""
    tp = s.tensor_parallel_degree
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = model_config_int(s.model_dir, key)
        if tp > 1 and heads is not None and heads % tp:
            fits = [d for d in range(1, heads + 1) if heads % d == 0]
            raise EngineError(
                f"tensor_parallel_degree={tp} does not divide the model's {key}={heads}: "
                f"set tensor_parallel_degree to one of {fits}"
            )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((MASTER_ADDR, 0))
        return int(sock.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torch.distributed's variables, plus LOCAL_SIZE: DeepSpeed's shared-memory all-reduce (deepspeed 0.19.8,
    csrc/cpu/comm/shm_interface.cpp) maps its buffers only when LOCAL_SIZE equals the world size; without it, as
    under torchrun, the first all-reduce dereferences unmapped buffers and the rank dies with SIGSEGV."""
    return {
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "LOCAL_SIZE": str(world),
    }


def threads_per_rank(world: int) -> int:
    """The CPU cores this process may use, shared evenly: one rank per core set (ranks compete otherwise)."""
    return max(1, len(os.sched_getaffinity(0)) // world)


class DeepSpeedEngine(TransformersEngine):
    """Rank 0 (``rank`` 0, the server) serves; ranks above it (worker.py) join its batches."""

    name = "deepspeed"

    def __init__(self, settings: EngineSettings, rank: int = 0, port: int | None = None) -> None:
        ds_extra, rest = split_extra(settings.extra)
        self._ds_config = inference_config(settings, ds_extra)  # refuse bad keys before loading anything
        check_shardable(settings)
        super().__init__(replace(settings, extra=rest))
        self.full_settings = settings  # what the worker ranks are started with
        self.rank = rank
        self.port = port
        self._workers: list[subprocess.Popen[bytes]] = []

    @property
    def world(self) -> int:
        return self.settings.tensor_parallel_degree

    async def start(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.world > 1 and self.rank == 0:
            self.port = free_port()
            self._workers = [self._launch(rank) for rank in range(1, self.world)]
        try:
            await asyncio.to_thread(self._build)
        except BaseException:
            self._stop_workers(0.0)
            raise

    def _launch(self, rank: int) -> subprocess.Popen[bytes]:
        """One worker rank: ``python -m runtime.engines.deepspeed.worker`` with this engine's settings."""
        assert self.port is not None
        env = os.environ | rank_env(rank, self.world, self.port)
        env |= {SETTINGS_ENV: settings_json(self.full_settings), "KILN_PARENT_PID": str(os.getpid())}
        if self.settings.device == "cpu":
            env["OMP_NUM_THREADS"] = str(threads_per_rank(self.world))
        cmd = [sys.executable, "-m", "runtime.engines.deepspeed.worker"]
        log.info("starting tensor-parallel rank %d of %d", rank, self.world)
        return subprocess.Popen(cmd, env=env)  # its output goes to the server's log

    def _build(self) -> None:
        if self.world > 1:  # before loading: on a GPU, set_device makes the model's .to("cuda") land on this rank's GPU
            self._join(import_deepspeed())
        super()._build()

    def _prepare_model(self, model: Any) -> Any:
        """The transformers engine's hook: shard the loaded model before the batching manager takes it."""
        deepspeed = import_deepspeed()
        engine = deepspeed.init_inference(model, config=self._ds_config | {"dtype": model.dtype})
        module = engine.module
        if self.world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            # transformers' manager finds TP through the model's mesh (as after from_pretrained(tp_plan=...)); the
            # model class's own tp_plan names k_proj/v_proj, so its cache holds num_key_value_heads / N per rank.
            module._device_mesh = init_device_mesh(self.settings.device, (self.world,))
        return module

    def _join(self, deepspeed: Any) -> None:
        """Join the process group (gloo on CPU, the accelerator's backend elsewhere)."""
        import torch

        assert self.port is not None
        os.environ.update(rank_env(self.rank, self.world, self.port))  # DeepSpeed's shm all-reduce reads them
        accelerator = deepspeed.accelerator.get_accelerator()
        if self.settings.device == "cpu":
            torch.set_num_threads(threads_per_rank(self.world))
        else:
            accelerator.set_device(self.rank)  # model.to("cuda") then lands on this rank's GPU
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(),
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=JOIN_TIMEOUT_S),
            init_method=f"tcp://{MASTER_ADDR}:{self.port}",
            rank=self.rank,
            world_size=self.world,
        )

    async def check_health(self) -> None:
        await super().check_health()
        for rank, proc in enumerate(self._workers, start=1):
            if proc.poll() is not None:
                raise EngineDeadError(f"tensor-parallel rank {rank} exited with {proc.returncode}")

    async def shutdown(self) -> None:
        await super().shutdown()  # the driver's stop reaches the other ranks' managers, which then exit
        await asyncio.to_thread(self._stop_workers, WORKER_STOP_S)
        _leave()

    def _stop_workers(self, grace: float) -> None:
        for proc in self._workers:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self._workers = []


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def settings_json(s: EngineSettings) -> str:
    """The settings a worker rank needs, as JSON (LoRA, speculation and compile caches do not apply here)."""
    return json.dumps(
        {
            "model_dir": str(s.model_dir),
            "dtype": s.dtype,
            "max_model_len": s.max_model_len,
            "max_num_seqs": s.max_num_seqs,
            "tensor_parallel_degree": s.tensor_parallel_degree,
            "enable_prefix_caching": s.enable_prefix_caching,
            "kv_cache_gib": s.kv_cache_gib,
            "device": s.device,
            "extra": dict(s.extra),
        }
    )


def settings_from_json(text: str) -> EngineSettings:
    from pathlib import Path

    data = json.loads(text)
    return EngineSettings(**(data | {"model_dir": Path(data["model_dir"])}))
