"""The transformers engine for embedding models (``task=embed``): an encoder loaded with ``AutoModel``, pooled as
the checkpoint's sentence-transformers modules say (``modules.json``, ``1_Pooling/config.json``), batched.

Requests that arrive while a batch runs wait for the next one, which takes them all (up to ``max_num_seqs``): one
padded forward pass per batch, in a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.engines.base import (
    AdapterRef,
    EmbedSpec,
    EngineDeadError,
    EngineError,
    EngineOutput,
    EngineRequestError,
    EngineSettings,
    EngineStats,
    SamplingSpec,
)

log = logging.getLogger("kiln.runtime.transformers")
DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
# sentence-transformers' pooling modes (1_Pooling/config.json) that kiln reproduces, in its key names.
POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


def read_pooling(model_dir: Path) -> str:
    """How token states become one vector: the checkpoint's sentence-transformers pooling mode, or, for a plain
    encoder, its [CLS] state (as vLLM's BertEmbeddingModel pools by default). Normalization is per request
    (``EmbedSpec.normalize``, on by default as in vLLM and LMI), not the model's Normalize module."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
    except (OSError, ValueError):
        return "cls"
    kinds = {str(m.get("type", "")).rpartition(".")[2]: str(m.get("path", "")) for m in modules}
    mode = "cls"
    if "Pooling" in kinds:
        cfg = json.loads((model_dir / kinds["Pooling"] / "config.json").read_text())
        if cfg.get("pooling_mode"):  # newer sentence-transformers write the mode by name
            mode = {"lasttoken": "last"}.get(str(cfg["pooling_mode"]), str(cfg["pooling_mode"]))
        else:
            mode = next((m for k, m in POOLING_KEYS.items() if cfg.get(k)), "mean")
    if mode not in POOLING_KEYS.values():
        raise EngineError(f"{model_dir}: sentence-transformers pooling mode {mode!r} is not served by kiln")
    return mode


def pool(states: Any, mask: Any, mode: str) -> Any:
    """[batch, tokens, hidden] states and their [batch, tokens] attention mask -> [batch, hidden]."""
    import torch

    m = mask.unsqueeze(-1).to(states.dtype)
    if mode == "mean":
        return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "max":
        return states.masked_fill(m == 0, torch.finfo(states.dtype).min).max(1).values
    if mode == "last":
        last = mask.sum(1) - 1  # right-padded: the last attended position
        return states[torch.arange(states.shape[0]), last]
    return states[:, 0]


@dataclass
class _Job:
    ids: list[int]
    spec: EmbedSpec
    done: asyncio.Future[list[float]]


class TransformersEmbedder:
    """The ``embed`` half of the engine interface; ``generate`` is refused (runtime/settings.py routes only
    embedding artifacts here)."""

    name = "transformers"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.max_model_len = settings.max_model_len or 0
        self._model: Any = None
        self._pooling = "cls"
        self._pad = 0
        self._hidden = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._dead: str | None = None
        self._running = 0

    async def start(self) -> None:
        if self.settings.tensor_parallel_degree != 1:
            raise EngineError("the transformers engine serves on one device: tensor_parallel_degree must be 1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        await asyncio.to_thread(self._build)
        self._worker = asyncio.create_task(self._loop())

    def _build(self) -> None:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        s = self.settings
        dtype = getattr(torch, DTYPES[s.dtype]) if s.dtype in DTYPES else "auto"
        self._model = AutoModel.from_pretrained(str(s.model_dir), dtype=dtype, attn_implementation="sdpa")
        self._model.to(s.device).eval()
        self._pooling = read_pooling(s.model_dir)
        cfg = self._model.config
        self._pad = int(getattr(cfg, "pad_token_id", 0) or 0)
        self._hidden = int(cfg.hidden_size)
        self.max_model_len = s.max_model_len or int(getattr(cfg, "max_position_embeddings", 0) or 512)

    async def embed(self, request_id: str, prompt_ids: list[int], spec: EmbedSpec) -> list[float]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if spec.dimensions is not None:
            raise EngineRequestError(
                f"this model does not support Matryoshka embeddings; dimensions must be unset "
                f"(received dimensions={spec.dimensions})",
                "dimensions",
            )
        if len(prompt_ids) > self.max_model_len:
            raise EngineRequestError(
                f"the input has {len(prompt_ids)} tokens, more than this model's {self.max_model_len}", "input"
            )
        job = _Job(list(prompt_ids), spec, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.done

    async def _loop(self) -> None:
        limit = self.settings.max_num_seqs or 32
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < limit and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            jobs = [j for j in jobs if not j.done.cancelled()]  # callers that went away
            if not jobs:
                continue
            self._running = len(jobs)
            try:
                vectors = await asyncio.to_thread(self._forward, [j.ids for j in jobs], [j.spec for j in jobs])
            except Exception as exc:  # a forward pass that fails leaves the model in doubt: report unhealthy
                self._dead = f"{type(exc).__name__}: {exc}"
                log.exception("embedding batch failed")
                for j in jobs:
                    if not j.done.done():
                        j.done.set_exception(EngineDeadError(self._dead))
                return
            finally:
                self._running = 0
            for j, v in zip(jobs, vectors, strict=True):
                if not j.done.done():
                    j.done.set_result(v)

    def _forward(self, batch: list[list[int]], specs: list[EmbedSpec]) -> list[list[float]]:
        import torch

        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = self.settings.device
        with torch.inference_mode():
            states = self._model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            pooled = pool(states.float(), mask.to(device), self._pooling)
        out = []
        for vec, spec in zip(pooled, specs, strict=True):
            if spec.normalize:
                vec = torch.nn.functional.normalize(vec, dim=0)
            out.append([float(x) for x in vec.cpu().tolist()])
        return out

    def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        raise EngineRequestError("this is an embedding model: it does not generate text")

    def validate(self, spec: SamplingSpec) -> None:
        raise EngineRequestError("this is an embedding model: it does not generate text")

    async def abort(self, request_id: str) -> None:
        return None  # a cancelled caller's job is skipped when its batch is formed

    async def add_adapter(self, adapter: AdapterRef, pin: bool = False) -> None:
        raise EngineRequestError("the transformers engine does not serve LoRA adapters", "src")

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        return None

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=self._queue.qsize())

    async def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._model = None
