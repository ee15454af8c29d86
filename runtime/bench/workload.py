"""The requests a benchmark sends: random prompts of a chosen token length, counted with the model's tokenizer.

The prompts are built as ``vllm bench serve --dataset-name random`` builds them: per request, input and output
lengths are drawn uniformly from ``[len * (1 - range_ratio), len * (1 + range_ratio)]``; a prompt is a run of
non-special token ids, decoded, re-encoded and trimmed or topped up until it encodes to its length (decoding then
encoding is not the identity for byte-pair tokenizers). Unlike vLLM, only ids that decode to text encoding back to
themselves are drawn (no lone UTF-8 fragments), so nearly every prompt reaches its length exactly; ``prompt_len`` is
always the prompt's real encoded length. A ``range_ratio`` of 0 gives fixed lengths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_len: int  # tokens, with the benchmark's tokenizer
    output_len: int  # max tokens asked for


def lengths(mean: int, range_ratio: float, rng: random.Random) -> int:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_requests(
    tokenizer: Any, count: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0
) -> list[Request]:
    """``count`` requests; the same seed and tokenizer give the same prompts."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    allowed = round_trip_ids(tokenizer)
    out = []
    for _ in range(count):
        n = lengths(input_len, range_ratio, rng)
        ids = [rng.choice(allowed) for _ in range(n)]
        prompt, n = _fit(tokenizer, ids, n, allowed, rng)
        out.append(Request(prompt, n, lengths(output_len, range_ratio, rng)))
    return out


def round_trip_ids(tokenizer: Any) -> list[int]:
    """The non-special ids whose decoded text encodes back to just that id."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [i for i, e in zip(ids, encoded, strict=True) if list(e) == [i]] or ids


def _fit(tokenizer: Any, ids: list[int], target: int, allowed: list[int], rng: random.Random) -> tuple[str, int]:
    """Decode ``ids`` to text whose encoding has ``target`` tokens (or the closest reached in a few tries)."""
    for _ in range(10):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == target:
            return text, target
        ids = ids[:target] if len(ids) > target else ids + [rng.choice(allowed) for _ in range(target - len(ids))]
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))
