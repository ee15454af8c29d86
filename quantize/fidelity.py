"""The fidelity report: how far the quantized checkpoint's next-token distributions are from the source's.

Both models run the same held-out token windows (never seen by calibration) in float32 on the CPU: the source
from its converted checkpoint, the quantized one from the files the stage wrote, loaded back and dequantized
by its own format's reader, with activation quantization simulated where the scheme quantizes activations.
So the figures are those of the shipped weights (quantization error alone, without bf16 arithmetic noise).

Reported, over every position that has a next token: the mean KL(source ‖ quantized) in nats, the fraction of
positions where both pick the same most likely token (top-1 agreement), and each model's perplexity on the
held-out text. For schemes that quantize activations, the KL and top-1 agreement of the quantized weights alone
(activations left unquantized) are reported too, so weight and activation error can be told apart. The gate
(``quantize.max_kl`` / ``quantize.min_top1``) is checked by the orchestrator before publication.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

BATCH = 4


@dataclass(frozen=True)
class Reference:
    """The source model's next-token log-probabilities on the held-out windows (float32, [windows, len-1, vocab])."""

    logprobs: Any
    nll: float  # mean negative log-likelihood of the actual next tokens


@dataclass(frozen=True)
class FidelityReport:
    kl_mean: float
    kl_max: float  # the worst single position
    top1_agreement: float
    ppl_source: float
    ppl_quantized: float
    positions: int
    windows: int
    seq_len: int
    kl_mean_weights_only: float  # equal to kl_mean for weight-only schemes
    top1_agreement_weights_only: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("kl_mean", "kl_max", "kl_mean_weights_only"):
            out[key] = float(f"{out[key]:.4e}")
        for key in ("top1_agreement", "top1_agreement_weights_only", "ppl_source", "ppl_quantized"):
            out[key] = round(out[key], 5)
        return out


def _batches(windows: list[list[int]]) -> Any:
    import torch

    for i in range(0, len(windows), BATCH):
        yield torch.tensor(windows[i : i + BATCH], dtype=torch.long)


def reference(model: Any, windows: list[list[int]]) -> Reference:
    """Run the source model once; keep its log-probabilities so it can be freed before the quantized one loads."""
    import torch

    chunks, nll, count = [], 0.0, 0
    with torch.inference_mode():
        for ids in _batches(windows):
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
            target = ids[:, 1:].unsqueeze(-1)
            nll += float(-logp.gather(-1, target).sum())
            count += target.numel()
            chunks.append(logp)
    return Reference(logprobs=torch.cat(chunks), nll=nll / count)


def compare(model: Any, windows: list[list[int]], ref: Reference) -> FidelityReport:
    """Run the quantized model on the same windows and compare it with the reference."""
    import torch

    kl_sum, kl_max, agree, nll, count = 0.0, 0.0, 0, 0.0, 0
    offset = 0
    with torch.inference_mode():
        for ids in _batches(windows):
            logq = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
            logp = ref.logprobs[offset : offset + len(ids)]
            offset += len(ids)
            kl = (logp.exp() * (logp - logq)).sum(-1)  # per position, nats
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
            nll += float(-logq.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())
            count += kl.numel()
    return FidelityReport(
        kl_mean=kl_sum / count,
        kl_max=kl_max,
        top1_agreement=agree / count,
        ppl_source=math.exp(ref.nll),
        ppl_quantized=math.exp(nll / count),
        positions=count,
        windows=len(windows),
        seq_len=len(windows[0]),
        kl_mean_weights_only=kl_sum / count,
        top1_agreement_weights_only=agree / count,
    )


def measure(
    load_source: Callable[[], Any],
    load_quantized: Callable[[], Any],
    windows: list[list[int]],
    weights_only: Callable[[Any], bool] = lambda model: False,
) -> FidelityReport:
    """Load, run and free one model at a time (peak memory: one model plus the reference log-probabilities).

    ``weights_only(model)`` switches the quantized model's activation quantization off and returns True, or
    returns False when the scheme quantizes no activations (the weights-only figures are then the same run).
    """
    import gc

    source = load_source()
    ref = reference(source, windows)
    del source
    gc.collect()
    quantized = load_quantized()
    report = compare(quantized, windows, ref)
    if weights_only(quantized):
        alone = compare(quantized, windows, ref)
        report = replace(report, kl_mean_weights_only=alone.kl_mean, top1_agreement_weights_only=alone.top1_agreement)
    del quantized
    gc.collect()
    return report


def gate_failures(report: Mapping[str, Any], max_kl: float | None, min_top1: float | None) -> list[str]:
    """The gate limits this report breaks, each with its figure (empty: publish)."""
    out = []
    if max_kl is not None and report["kl_mean"] > max_kl:
        out.append(f"KL {report['kl_mean']:.3e} nats > quantize.max_kl={max_kl:g}")
    if min_top1 is not None and report["top1_agreement"] < min_top1:
        out.append(f"top-1 agreement {report['top1_agreement']:.4f} < quantize.min_top1={min_top1:g}")
    return out
