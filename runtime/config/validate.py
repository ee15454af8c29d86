"""Validation of the merged configuration: the schema's types and ranges, engine-native pass-through keys, and
the artifact's target block (operator values that contradict what was built are refused). Problems are collected,
never raised one at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from artifacts.manifest import Target
from runtime.config.schema import Entry, Origin, ServeConfig, shown


def check_native(
    extra: dict[str, Entry], engine: str, native_keys: Callable[[str], set[str]] | None, problems: list[str]
) -> None:
    if not extra:
        return
    accepted: set[str] = set()
    if native_keys is not None:
        try:
            accepted = native_keys(engine)
        except (ImportError, KeyError) as exc:
            problems.append(f"cannot list the {engine} engine's own keys to check {sorted(extra)}: {exc}")
            return
    for key, entry in sorted(extra.items()):
        if key not in accepted:
            problems.append(f"{entry.origin}: not a kiln setting and not a {engine} engine argument")


def validate(values: dict[str, Any], known: dict[str, Entry], problems: list[str]) -> ServeConfig | None:
    try:
        return ServeConfig.model_validate(values)
    except ValidationError as exc:
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            where = known[key].origin if key in known else Origin("default", "")
            problems.append(f"{where}={shown(key, values.get(key))}: {err['msg']}")
        return None


def validate_valid(values: dict[str, Any]) -> ServeConfig:
    """The configuration without the values that failed validation (their defaults instead)."""
    try:
        return ServeConfig.model_validate(values)
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        return ServeConfig.model_validate({k: v for k, v in values.items() if k not in bad})


def check_target(config: ServeConfig, known: dict[str, Entry], t: Target, problems: list[str]) -> None:
    """The artifact was built for its target block; operator values that contradict it are refused."""

    def where(key: str) -> Origin:
        return known[key].origin

    if config.engine is not None and config.engine != t.engine:
        problems.append(f"{where('engine')}={config.engine!r}: the artifact was built for target.engine={t.engine!r}")
    if config.max_model_len is not None and config.max_model_len > t.max_model_len:
        problems.append(
            f"{where('max_model_len')}={config.max_model_len}: exceeds the artifact's "
            f"target.max_model_len={t.max_model_len}"
        )
    tp = config.tensor_parallel_degree
    if tp is not None and tp != t.tensor_parallel_degree:
        problems.append(
            f"{where('tensor_parallel_degree')}={tp}: the artifact was built for "
            f"target.tensor_parallel_degree={t.tensor_parallel_degree}"
        )
    if config.dtype not in ("auto", t.dtype) and t.quantization != "none":
        problems.append(
            f"{where('dtype')}={config.dtype!r}: the artifact is quantized ({t.quantization}) at "
            f"target.dtype={t.dtype!r}"
        )
