"""Synthesize the tiny Llama checkpoint: seeded weights, optionally a brief deterministic CPU training run.

Weights are drawn per tensor from a generator seeded by (seed, tensor name), so they do not depend on
module construction order or library internals: the same config gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build.tiny.corpus import documents
from build.tiny.tokenizer import BOS, END, EOS_DOC, PAD, train_tokenizer

log = logging.getLogger("kiln.build.tiny")


@dataclass(frozen=True)
class SynthParams:
    seed: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    corpus_sentences: int
    train_steps: int
    train_batch_size: int
    train_seq_len: int
    learning_rate: float
    train_threads: int


def llama_config(p: SynthParams, token_ids: Mapping[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.hidden_size // p.num_attention_heads,
        "max_position_embeddings": p.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": token_ids[BOS],
        "eos_token_id": [token_ids[EOS_DOC], token_ids[END]],
        "pad_token_id": token_ids[PAD],
        "torch_dtype": "float32",
    }


def param_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama checkpoint's tensors, in Hugging Face naming."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{n}."
        shapes |= {
            pre + "self_attn.q_proj.weight": (q, h),
            pre + "self_attn.k_proj.weight": (kv, h),
            pre + "self_attn.v_proj.weight": (kv, h),
            pre + "self_attn.o_proj.weight": (h, q),
            pre + "mlp.gate_proj.weight": (i, h),
            pre + "mlp.up_proj.weight": (i, h),
            pre + "mlp.down_proj.weight": (h, i),
            pre + "input_layernorm.weight": (h,),
            pre + "post_attention_layernorm.weight": (h,),
        }
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def init_weights(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    import torch

    tensors = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        tensors[name] = torch.randn(shape, generator=gen) * cfg["initializer_range"]
    return tensors


def synthesize(p: SynthParams, out: Path) -> dict[str, Any]:
    """Write a complete HF checkpoint (fp32 safetensors, tokenizer, chat template, generation config)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    texts = list(documents(p.corpus_sentences, seed=p.seed))
    vocab = train_tokenizer(texts, p.vocab_size, out)
    if vocab > p.vocab_size:
        raise ValueError(f"tokenizer has {vocab} tokens, more than model.synth.vocab_size={p.vocab_size}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    vocab_ids = tokenizer.get_vocab()
    ids = {t: int(vocab_ids[t]) for t in (BOS, EOS_DOC, PAD, END)}
    cfg = llama_config(p, ids)
    weights = init_weights(cfg, p.seed)
    stats: dict[str, Any] = {"tokenizer_vocab": vocab}
    if p.train_steps > 0:
        weights, stats["train"] = train(cfg, weights, tokenizer, texts, p)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS_DOC], ids[END]],
        "pad_token_id": ids[PAD],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    save_file(
        {k: t.contiguous() for k, t in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return stats


def train(
    cfg: Mapping[str, Any], weights: dict[str, Any], tokenizer: Any, texts: list[str], p: SynthParams
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A short, deterministic AdamW run on the corpus (fixed seed, threads and deterministic algorithms)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(p.train_threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(p.seed)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
        model.load_state_dict(weights, strict=True)
        stream = torch.tensor(tokenizer("".join(f"{BOS}{t}{EOS_DOC}" for t in texts))["input_ids"])
        losses = _train_loop(model, stream, p)
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    return trained, {"steps": p.train_steps, "first_loss": losses[0], "final_loss": losses[-1]}


def _train_loop(model: Any, stream: Any, p: SynthParams) -> list[float]:
    import math

    import torch

    gen = torch.Generator().manual_seed(p.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, p.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, p.train_steps) / p.train_steps)),
    )
    model.train()
    losses, start = [], time.monotonic()
    for step in range(p.train_steps):
        starts = torch.randint(0, len(stream) - p.train_seq_len - 1, (p.train_batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + p.train_seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == p.train_steps - 1:
            log.info(
                "train step %d/%d loss %.3f (%.0fs)", step + 1, p.train_steps, losses[-1], time.monotonic() - start
            )
    model.eval()
    return losses


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Stage entry (JSON in, JSON out) used by the toolchain runner."""
    del inputs
    return synthesize(SynthParams(**params), out)
