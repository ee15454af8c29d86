"""One measurement for ``tests.bench.quantize_time``, run in the llm-compressor toolchain interpreter.

    python -m tests.bench._quantize_child direct|kiln SPEC.json OUT_DIR

Prints one JSON line: ``{"seconds": …}`` (work after imports), plus ``fidelity_seconds`` in kiln mode.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from quantize import data, fidelity, preflight
from quantize.llmcompressor_backend import (
    LlmCompressor,
    calibration_dataset,
    cpu_without_pinned_memory,
    load_for_quantization,
    needs_data,
    recipe,
)
from quantize.stage import carry_files, load_source, parse, seed_everything


def main(mode: str, spec_path: str, out: str) -> None:
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    spec = json.loads(Path(spec_path).read_text())
    p = parse(spec["params"])
    cfg = p.config
    model_dir, calib, out_dir = Path(spec["model"]), Path(spec["calibration"]), Path(out)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    seed_everything(cfg.seed)
    if mode == "direct":
        # The user's own script: the same windows (prepared outside the timing), the same recipe.
        windows = data.windows(calib, tokenizer, cfg.text_field, cfg.seq_len, cfg.num_samples, cfg.eval_samples)
        start = time.monotonic()
        model = load_for_quantization(model_dir, p.dtype)
        kwargs = {}
        if needs_data(cfg):
            kwargs = {
                "dataset": calibration_dataset(windows.calibration),
                "num_calibration_samples": cfg.num_samples,
                "max_seq_length": cfg.seq_len,
                "shuffle_calibration_samples": False,
            }
        # The user's script needs kiln's AWQ workaround too: llm-compressor 0.14.0.1 pins memory on CPU-only hosts.
        with cpu_without_pinned_memory():
            oneshot(model=model, recipe=recipe(cfg), **kwargs)
        model.save_pretrained(str(out_dir), save_compressed=True)
        print(json.dumps({"seconds": time.monotonic() - start}))
        return
    start = time.monotonic()
    preflight.check(model_dir, cfg, p.plan)
    windows = data.windows(calib, tokenizer, cfg.text_field, cfg.seq_len, cfg.num_samples, cfg.eval_samples)
    backend = LlmCompressor()
    backend.quantize(model_dir, p, windows.calibration, out_dir)
    carry_files(model_dir, out_dir)
    seconds = time.monotonic() - start
    start = time.monotonic()
    fidelity.measure(lambda: load_source(model_dir), lambda: backend.load_quantized(out_dir), windows.heldout)
    print(json.dumps({"seconds": seconds, "fidelity_seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
