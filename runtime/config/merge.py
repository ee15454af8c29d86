"""The serving configuration: one model, one precedence, validated once, every value traced to its source.

Sources, lowest precedence first::

    default < artifact (the manifest's "serving" block) < serving.properties (in the model directory)
            < environment (OPTION_* / SERVING_* and the LMI, TGI and SageMaker aliases) < command line

LMI users' names work (``option.max_rolling_batch_size``, ``MAX_BATCH_SIZE``, ``option.tensor_parallel_degree`` …)
beside vLLM's (``max_num_seqs``, ``tensor_parallel_size`` …); two names for one setting in one source must agree.
A key that is not a kiln setting passes through to the engine when the engine accepts it (vLLM: an
``AsyncEngineArgs`` field), else the server refuses to start naming it. The artifact's target block wins where an
operator value would contradict what was built (a longer ``max_model_len``, another engine or parallel degree).
All problems are reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from artifacts.manifest import Target
from runtime import engines
from runtime.config.aliases import ALIASES, DTYPE_NAMES, IGNORED, TASK_NAMES
from runtime.config.schema import (
    CONTAINER_HOST,
    FIELDS,
    OPERATOR_ONLY,
    PROPERTIES,
    ConfigError,
    Entry,
    Origin,
    Resolved,
    shown,
)
from runtime.config.sources import Sources
from runtime.config.validate import check_native, check_target, validate, validate_valid


def resolve_config(
    sources: Sources,
    target: Target | None,
    native_keys: Callable[[str], set[str]] | None = None,
    container: bool = False,
) -> Resolved:
    """Merge the sources by precedence, validate, and check the result against the artifact's target block
    (None: a plain Hugging Face directory). In ``container`` mode the server listens on 0.0.0.0 unless a source
    sets ``host``.

    ``native_keys(engine)`` lists the engine's own keys; it is called only when some key needs passing through
    (it imports the engine library). Raises :class:`PartialConfigError` listing every problem, carrying the
    configuration made of the valid values so that later start-up checks can still run and report too.
    """
    problems: list[str] = []
    ignored: list[tuple[Origin, str]] = []
    merged: dict[str, Entry] = {e.key: e for e in sources.located}
    if target is None:
        for hint in sources.hints:
            merged[hint.key] = hint
    for layer in sources.layers():
        merged.update(_merge_layer(layer, problems, ignored))
    if container and "host" not in merged:
        merged["host"] = Entry("host", CONTAINER_HOST, Origin("default", "container mode"))

    known = {k: e for k, e in merged.items() if k in FIELDS}
    extra = {k: e for k, e in merged.items() if k not in FIELDS}
    engine = _engine_name(known, target)
    check_native(extra, engine, native_keys, problems)
    values = {k: e.value for k, e in known.items()}
    values["engine_args"] = {k: _parse_scalar(e.value) for k, e in extra.items()}
    config = validate(values, known, problems)
    # Check the target block even when some values are invalid (all problems in one message): the valid ones.
    checked = config or validate_valid(values)
    if target is not None:
        check_target(checked, known, target, problems)
    origins = {k: e.origin for k, e in known.items()} | {f"engine_args.{k}": e.origin for k, e in extra.items()}
    resolved = Resolved(checked, origins, tuple(ignored))
    if problems:
        raise PartialConfigError(problems, resolved)
    return resolved


class PartialConfigError(ConfigError):
    """Configuration problems, plus the configuration of the values that were valid (``partial``)."""

    def __init__(self, problems: list[str], partial: Resolved) -> None:
        super().__init__(problems)
        self.partial = partial


def _merge_layer(layer: list[Entry], problems: list[str], ignored: list[tuple[Origin, str]]) -> dict[str, Entry]:
    """Resolve aliases within one source; two names for one setting must agree unless one is a translation."""
    out: dict[str, Entry] = {}
    for raw in layer:
        if not raw.key:
            problems.append(f"{raw.origin}: not a setting")
            continue
        entry = _normalize(raw, problems, ignored)
        if entry is None:
            continue
        if entry.key in OPERATOR_ONLY and entry.origin.source in ("artifact", PROPERTIES):
            problems.append(
                f"{entry.origin}: {entry.key} cannot come from the model's own files (whoever can change the model "
                "could choose who may sign it); set it in the environment (OPTION_TRUSTED_KEYS) or on the command line"
            )
            continue
        prev = out.get(entry.key)
        if prev is None or entry.rank > prev.rank:
            out[entry.key] = entry
        elif entry.rank == prev.rank and str(prev.value) != str(entry.value):
            first, second = shown(entry.key, prev.value), shown(entry.key, entry.value)
            problems.append(
                f"{prev.origin}={first} and {entry.origin.name}={second} set the same setting ({entry.key}) to "
                "different values; keep one"
            )
    return out


def _normalize(entry: Entry, problems: list[str], ignored: list[tuple[Origin, str]]) -> Entry | None:
    key, value = entry.key, entry.value
    if key in IGNORED:
        ignored.append((entry.origin, IGNORED[key]))
        return None
    if key == "engine" and str(value).lower() in ("python", "mpi"):
        ignored.append((entry.origin, "LMI's worker type; kiln runs the engine named by the artifact"))
        return None
    if key == "entrypoint":
        if str(value).startswith("djl_python"):
            ignored.append((entry.origin, "LMI's built-in handler; kiln's routes replace it"))
        else:
            problems.append(f"{entry.origin}={shown(key, value)}: custom handler modules are not supported")
        return None
    if key == "batch_size":
        _lmi_mode(entry, problems, ignored)
        return None
    if key == "task":
        task = TASK_NAMES.get(str(value).strip().lower())
        if task is None:
            known = ", ".join(TASK_NAMES)
            problems.append(f"{entry.origin}={shown(key, value)}: this task is not supported; kiln serves {known}")
            return None
        value = task
    if key in ("tensor_parallel_degree", "tensor_parallel_size") and str(value).strip().lower() == "max":
        ignored.append((entry.origin, "the degree comes from the artifact's target block (a plain directory: 1)"))
        return None
    if key in ALIASES:
        key, convert = ALIASES[key]
        if convert is not None:
            try:
                value = convert(value)
            except (TypeError, ValueError, OverflowError):
                problems.append(f"{entry.origin}={shown(key, value)}: not a valid value")
                return None
        if key == "engine" and value is None:
            ignored.append((entry.origin, "the engine comes from the artifact's target block"))
            return None
    if key == "dtype" and isinstance(value, str):
        value = DTYPE_NAMES.get(value.lower(), value.lower())
    return Entry(key, value, entry.origin, entry.rank)


def _lmi_mode(entry: Entry, problems: list[str], ignored: list[tuple[Origin, str]]) -> None:
    """LMI's dynamic batching (batch_size > 1) has no kiln equivalent: the engine batches."""
    if str(entry.value).strip().lower() == "1":
        ignored.append((entry.origin, "requests are batched by the engine"))
    else:
        problems.append(
            f"{entry.origin}={shown(entry.key, entry.value)}: dynamic batching is not supported; the engine batches"
        )


def _engine_name(known: dict[str, Entry], target: Target | None) -> str:
    if "engine" in known:
        return str(known["engine"].value)
    return target.engine if target is not None else engines.DEFAULT


def _parse_scalar(value: Any) -> Any:
    """Engine pass-through values from text sources: JSON where it parses (numbers, true/false, objects)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: arrays nested beyond the parser's stack
        return text
