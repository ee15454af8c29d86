"""Calibration and held-out text: read documents from the calibration input, cut them into token windows.

The orchestrator hands the stage one input, ``calibration``: a file or a directory (kiln's corpus written by
the build, a local file or directory, or a downloaded hub dataset). Documents are read in a fixed order
(sorted file names, file order within a file), joined, tokenized with the model's own tokenizer and cut into
consecutive windows of ``seq_len`` tokens: the first ``num_samples`` calibrate, the next ``eval_samples`` are
held out for the fidelity report. Windows are disjoint, so the report is measured on text the quantizer
never saw. The same input and tokenizer always give the same windows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.errors import QuantizeError

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSON_SUFFIXES + TABLE_SUFFIXES
DOC_SEPARATOR = "\n\n"
KEY = "quantize.calibration"


@dataclass(frozen=True)
class Windows:
    calibration: list[list[int]]
    heldout: list[list[int]]
    tokens_read: int


def data_files(path: Path) -> list[Path]:
    """The files a calibration source holds, in a fixed order (hidden files and unknown suffixes skipped)."""
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in SUPPORTED and not any(part.startswith(".") for part in p.parts)
    )


def documents(path: Path, text_field: str) -> Iterator[str]:
    """Every non-empty document under ``path``: a paragraph of a text file, a JSONL line, a JSON item, a table row."""
    files = data_files(path)
    if not files:
        raise QuantizeError(
            f"{path} holds no calibration text ({', '.join(SUPPORTED)} files)",
            key=KEY,
            fix="point quantize.calibration at a text or JSONL file, or a directory of them",
        )
    for file in files:
        for doc in _read(file, text_field):
            if doc.strip():
                yield doc


def _read(file: Path, text_field: str) -> Iterator[str]:
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        # Paragraph by paragraph, so a large file is only read and tokenized as far as the windows need.
        with file.open(encoding="utf-8", errors="replace") as f:
            paragraph: list[str] = []
            for line in f:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph).rstrip("\n")
                    paragraph = []
            if paragraph:
                yield "".join(paragraph).rstrip("\n")
    elif suffix == ".jsonl":
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                yield _text_of(_json(line, f"{file}:{n}"), text_field, f"{file}:{n}")
    elif suffix == ".json":
        data = _json(file.read_text(encoding="utf-8"), str(file))
        rows = data.get(text_field, data.get("data", [])) if isinstance(data, dict) else data
        for n, row in enumerate(rows if isinstance(rows, list) else [rows]):
            yield _text_of(row, text_field, f"{file}[{n}]")
    else:
        yield from _parquet(file, text_field)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuantizeError(f"{where} is not valid JSON: {exc}", key=KEY) from exc


def _text_of(row: Any, text_field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get(text_field), str):
        return str(row[text_field])
    raise QuantizeError(
        f"{where} has no string field {text_field!r}",
        key="quantize.text_field",
        fix="set quantize.text_field to the field holding the text",
    )


def _parquet(file: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow ships with the quantize toolchains
        raise QuantizeError(f"{file}: reading parquet needs pyarrow", key=KEY) from exc
    table = pq.read_table(file)
    if text_field not in table.column_names:
        raise QuantizeError(
            f"{file} has no column {text_field!r} (columns: {table.column_names})",
            key="quantize.text_field",
            fix="set quantize.text_field to the column holding the text",
        )
    for value in table.column(text_field).to_pylist():
        if isinstance(value, str):
            yield value


def windows(path: Path, tokenizer: Any, text_field: str, seq_len: int, n_calib: int, n_eval: int) -> Windows:
    """Tokenize documents until ``n_calib + n_eval`` windows of ``seq_len`` tokens are filled.

    Each window starts with the tokenizer's BOS token when it has one, as every real prompt does.
    """
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    needed = (n_calib + n_eval) * body
    ids: list[int] = []
    for doc in documents(path, text_field):
        ids += tokenizer(doc + DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    if not ids:
        raise QuantizeError(f"{path} holds only empty documents", key=KEY, fix="add text to the calibration data")
    if len(ids) < needed:
        have = len(ids) // body
        raise QuantizeError(
            f"{path} holds {len(ids)} tokens: {have} window(s) of quantize.seq_len={seq_len}, but "
            f"quantize.num_samples={n_calib} + quantize.eval_samples={n_eval} = {n_calib + n_eval} are needed",
            key=KEY,
            fix="add calibration text, or lower quantize.num_samples / quantize.eval_samples / quantize.seq_len",
        )
    cut = [([bos] if bos is not None else []) + ids[i * body : (i + 1) * body] for i in range(n_calib + n_eval)]
    return Windows(calibration=cut[:n_calib], heldout=cut[n_calib:], tokens_read=len(ids))
