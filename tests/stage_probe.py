"""A trivial stage for the stage-cache tests: copies its input and writes its params."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    shutil.copytree(inputs["src"], out / "src")
    (out / "params.json").write_text(json.dumps(dict(params), sort_keys=True))
    return {"n": len(list(out.rglob("*")))}
