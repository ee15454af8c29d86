"""Where configuration values come from: the artifact's serving block, ``serving.properties``, the environment
(``OPTION_*``, ``SERVING_*`` and the LMI/TGI/SageMaker names) and the command line, each read into
:class:`Entry` values that carry their origin."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.config.aliases import ENV_ALIASES, HOST_HINTS, canonical
from runtime.config.schema import PROPERTIES, ConfigError, Entry, Origin, shown


def read_properties(path: Path) -> list[Entry]:
    """``serving.properties``: Java-properties lines ``key=value`` (``#``/``!`` comments, ``:`` also separates)."""
    entries = []
    for n, raw in enumerate(_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        sep = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if sep < 0:
            entries.append(Entry("", None, Origin(PROPERTIES, f"line {n}: {shown('', line)} (expected key=value)")))
            continue
        key, value = line[:sep].strip(), line[sep + 1 :].strip()
        if CONTROL.search(line):  # a NUL would reach a path or the engine; no setting holds control characters
            where = f"line {n}: {shown('', line)}"
            entries.append(Entry("", None, Origin(PROPERTIES, f"{where} holds a control character; remove it")))
            continue
        entries.append(Entry(canonical(key), value, Origin(PROPERTIES, key)))
    return entries


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is dropped
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"{path.name} line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; save the file as UTF-8"]
        ) from None


def read_env(env: Mapping[str, str]) -> tuple[list[Entry], list[Entry]]:
    """OPTION_<KEY> and SERVING_<KEY> (lower-cased), plus the alias table; returns (entries, host hints)."""
    entries, hints = [], []
    for name, value in sorted(env.items()):
        if name.startswith(("OPTION_", "SERVING_")):
            key = canonical(name.split("_", 1)[1])
            if key:
                entries.append(Entry(key, value, Origin("env", name)))
        elif name in ENV_ALIASES:
            key, rank = ENV_ALIASES[name]
            if name == "ENABLE_CUDA_GRAPHS":
                value = _invert_bool(value)
            entries.append(Entry(key, value, Origin("env", name), rank=rank))
        elif name in HOST_HINTS and value.strip() not in ("", "0"):
            hints.append(Entry(HOST_HINTS[name], value, Origin("env", name), rank=0))
    return entries, hints


def _invert_bool(value: str) -> Any:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return "false"
    if low in ("false", "0", "no", "off"):
        return "true"
    return value  # left for validation to name


def artifact_entries(serving: Mapping[str, Any]) -> list[Entry]:
    """The manifest's ``serving`` block (the build's ``serving.*`` settings)."""
    return [Entry(canonical(k), v, Origin("artifact", f"serving.{k}")) for k, v in serving.items() if v is not None]


def cli_entries(values: Mapping[str, Any], options: list[str]) -> list[Entry]:
    """Explicit flags (already canonical names) plus ``--option KEY=VALUE`` pairs."""
    entries = [
        Entry(k, v, Origin("cli", "--" + k.replace("_", "-")))
        for k, v in values.items()
        if v is not None and k != "model"
    ]
    if values.get("model"):
        entries.append(Entry("model", values["model"], Origin("cli", "MODEL argument")))
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            entries.append(Entry("", None, Origin("cli", f"--option {shown('', item)} (expected KEY=VALUE)")))
        else:
            entries.append(Entry(canonical(key), value, Origin("cli", f"--option {key.strip()}")))
    return entries


def properties_in(path: Path) -> list[Entry]:
    f = path / PROPERTIES
    return read_properties(f) if f.is_file() else []


@dataclass
class Sources:
    """Everything the configuration is made from, in precedence order."""

    artifact: list[Entry] = field(default_factory=list)
    properties: list[Entry] = field(default_factory=list)
    env: list[Entry] = field(default_factory=list)
    cli: list[Entry] = field(default_factory=list)
    hints: list[Entry] = field(default_factory=list)  # host facts (SM_NUM_GPUS), below every source
    located: list[Entry] = field(default_factory=list)  # where the model was found (SM_MODEL_DIR …), lowest

    def layers(self) -> list[list[Entry]]:
        return [self.artifact, self.properties, self.env, self.cli]
