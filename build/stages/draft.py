"""The draft stage: the converted model with its converted draft model as ``draft/``, after checking that the draft
can propose tokens for it (the same tokenizer, artifacts/tokenizers.py). Files are hard-linked from the stage cache
where the filesystem allows, so a large model is not copied again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artifacts.ops import link_tree
from artifacts.tokenizers import tokenizer_mismatch
from build.errors import BuildError


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    model, draft, folder = inputs["model"], inputs["draft"], str(params["folder"])
    why = tokenizer_mismatch(model, draft)
    if why is not None:
        raise BuildError(
            "draft",
            f"the draft model cannot propose tokens for this model: {why}",
            key="speculative.draft.source",
            fix="use a draft model with the model's tokenizer (usually a smaller model of the same family)",
        )
    link_tree(model, out)
    link_tree(draft, out / folder)
    cfg = json.loads((draft / "config.json").read_text())
    return {
        "draft": {
            "folder": folder,
            "architecture": (cfg.get("architectures") or [None])[0],
            "num_hidden_layers": cfg.get("num_hidden_layers"),
            "vocab_size": cfg.get("vocab_size"),
        }
    }
