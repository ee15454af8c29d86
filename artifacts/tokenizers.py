"""Whether two checkpoints share a tokenizer: a draft model proposes token ids that the target model verifies, so
the ids must mean the same text in both. Checked by the build before it packages a draft model and by the runtime
before it starts an engine with one (standard library only: both halves call it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Files that define a tokenizer's ids when there is no tokenizer.json (slow tokenizers' vocabularies).
_VOCAB_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "spiece.model")
_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_mismatch(target: Path, draft: Path) -> str | None:
    """Why the checkpoint in ``draft`` cannot draft tokens for the one in ``target`` (None: it can)."""
    t_cfg, d_cfg = _json(target / "config.json"), _json(draft / "config.json")
    t_vocab, d_vocab = _vocab_size(t_cfg), _vocab_size(d_cfg)
    if t_vocab != d_vocab:
        return f"the draft's vocab_size is {d_vocab} and the target's {t_vocab}"
    t_ids, d_ids = _token_ids(target), _token_ids(draft)
    if t_ids is None or d_ids is None:
        missing = target if t_ids is None else draft
        return f"{missing} holds no tokenizer (tokenizer.json or a vocabulary file) to compare"
    if t_ids != d_ids:
        return f"the tokenizers differ ({_first_difference(t_ids, d_ids)})"
    for key in _SPECIAL:
        if key in t_cfg and key in d_cfg and t_cfg[key] != d_cfg[key]:
            return f"the draft's {key} is {d_cfg[key]} and the target's {t_cfg[key]}"
    return None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _vocab_size(cfg: dict[str, Any]) -> int | None:
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return int(size) if isinstance(size, int) else None


def _token_ids(model_dir: Path) -> dict[str, Any] | None:
    """What fixes the token ids: tokenizer.json's vocabulary, merges and added tokens (the rest of the file, e.g.
    truncation or padding settings, does not change ids), else the digests of the vocabulary files."""
    tok = _json(model_dir / "tokenizer.json")
    if tok:
        model = tok.get("model") or {}
        added = sorted((a.get("id"), a.get("content")) for a in tok.get("added_tokens") or [])
        return {"vocab": model.get("vocab"), "merges": model.get("merges"), "added": added}
    files = {
        n: hashlib.sha256((model_dir / n).read_bytes()).hexdigest() for n in _VOCAB_FILES if (model_dir / n).is_file()
    }
    return files or None


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                diff = sorted(k for k in set(a[key]) ^ set(b[key]) | {k for k in a[key] if a[key][k] != b[key].get(k)})
                return f"{key}: {len(diff)} entries differ, e.g. {diff[0]!r}" if diff else key
            return f"{key} differs"
    return "unknown difference"
