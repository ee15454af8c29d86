"""``python -m runtime config``: the resolved configuration, one setting per line with its source, and the values
the engine chose for settings the configuration left open (``max_num_seqs``, the KV cache on CPU)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from runtime.config.schema import SECRET_FIELDS, Resolved
from runtime.engines.base import EngineDefault


def rows(resolved: Resolved, chosen: Mapping[str, EngineDefault] | None = None) -> list[tuple[str, Any, str]]:
    """(key, effective value, source) for every setting and engine argument."""
    chosen = chosen or {}
    cfg = resolved.config.model_dump()
    args = cfg.pop("engine_args")
    out = []
    for key, value in cfg.items():
        if key in chosen:
            out.append((key, chosen[key].value, f"engine default ({chosen[key].why})"))
        else:
            shown = "***" if key in SECRET_FIELDS and value is not None else value
            out.append((key, shown, str(resolved.origin(key))))
    out += [(f"engine_args.{k}", v, str(resolved.origin(f"engine_args.{k}"))) for k, v in args.items()]
    return out


def render(resolved: Resolved, chosen: Mapping[str, EngineDefault] | None = None) -> str:
    table = rows(resolved, chosen)
    width = max(len(k) for k, _, _ in table)
    lines = [f"{k:<{width}}  {_show(v):<24}  {source}" for k, v, source in table]
    lines += [f"ignored: {o} ({why})" for o, why in resolved.ignored]
    return "\n".join(lines)


def as_json(resolved: Resolved, chosen: Mapping[str, EngineDefault] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {k: {"value": v, "source": source} for k, v, source in rows(resolved, chosen)}
    out["ignored"] = [{"key": str(o), "why": why} for o, why in resolved.ignored]
    return out


def _show(value: Any) -> str:
    return "-" if value is None else json.dumps(value) if not isinstance(value, str) else value
