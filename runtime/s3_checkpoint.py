"""Serve a plain Hugging Face checkpoint stored under an S3 prefix (LMI's ``HF_MODEL_ID=s3://bucket/llama/``).

What the prefix holds decides what it is: ``config.json`` at its top makes it a checkpoint; anything else is left
to the kiln-artifact reading of the URI (``s3://store/<name>``), and where neither fits, one error names both.

The files are mirrored into the kiln cache (:mod:`artifacts.s3_mirror`: ETag-pinned, hashed while written, checked
against S3's SHA-256 where it holds one, re-verified on every start). Only configuration, tokenizer, template and
safetensors files are fetched; pickle weights only with ``allow_pickle``. The small files come first, because the
configuration checks read them; the weights come in a :class:`WeightFetch`, which ``serve`` starts at once and
waits for only when the engine is about to read them, so the download overlaps the engine's start-up.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from pathlib import Path

from artifacts.errors import ArtifactError
from artifacts.s3_mirror import Listed, Mirror, open_prefix

log = logging.getLogger("kiln.runtime")

SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
SAFETENSORS = ["*.safetensors"]
PICKLE = ["*.bin", "*.pt", "*.pth"]
KIND = "plain Hugging Face checkpoint on S3"


class WeightFetch:
    """The weight files of a mirror, fetched in a background thread; ``wait`` re-raises what stopped it."""

    def __init__(self, mirror: Mirror, patterns: list[str]) -> None:
        self.mirror = mirror
        self.patterns = patterns
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kiln-weights", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        self.start()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            self.mirror.fetch(lambda rel: _matches(rel, self.patterns))
        except BaseException as exc:  # handed to the waiter, which reports it
            self._error = exc


def open_checkpoint(uri: str, allow_pickle: bool) -> tuple[Path, WeightFetch] | None:
    """The mirror directory (small files already fetched and verified) and the pending weights of the checkpoint
    under ``uri``; None when the prefix holds nothing at all (it may name a kiln artifact instead).

    Raises ArtifactError naming what the prefix holds and the fix where it is not a servable checkpoint.
    """
    weights = SAFETENSORS + (PICKLE if allow_pickle else [])
    mirror = open_prefix(uri, SMALL_FILES + weights)
    if not mirror.listed:
        return None
    _check_holds_a_checkpoint(uri, mirror.listed, allow_pickle)
    mirror.fetch(lambda rel: not _matches(rel, weights))
    return mirror.files, WeightFetch(mirror, weights)


def nothing_there(uri: str, artifact_problem: str) -> ArtifactError:
    return ArtifactError(
        f"{uri}: nothing to serve: the prefix holds no objects (so no Hugging Face checkpoint), and as a kiln "
        f"artifact reference it failed too ({artifact_problem}); check the bucket and prefix, or copy a checkpoint "
        f"there (aws s3 sync ./my-model {uri.rstrip('/')}/)"
    )


def _check_holds_a_checkpoint(uri: str, listed: list[Listed], allow_pickle: bool) -> None:
    rels = [o.rel for o in listed]
    top = uri.rstrip("/")
    if "config.json" not in rels:
        if any(r.startswith(("names/", "blobs/")) for r in rels):
            raise ArtifactError(
                f"{uri} is a kiln artifact store, not a model: name an artifact in it ({top}/<name>:<tag> or "
                f"{top}/<name>@sha256:<digest>; python -m artifacts list {top} shows them)"
            )
        nested = sorted(r.rsplit("/", 1)[0] for r in rels if r.endswith("/config.json"))
        where = f"; config.json is under {top}/{nested[0]}/: point there" if nested else ""
        raise ArtifactError(
            f"{uri} holds {len(rels)} objects but no config.json at its top: it is not a Hugging Face checkpoint{where}"
        )
    if any(_matches(r, SAFETENSORS) for r in rels):
        return
    pickled = [r for r in rels if _matches(r, PICKLE)]
    if pickled and not allow_pickle:
        raise ArtifactError(
            f"{uri} holds only pickle weights ({', '.join(pickled[:3])}), which can run code when loaded, so kiln "
            "does not fetch them unless told to: convert the checkpoint to safetensors, or allow them for a "
            "checkpoint you trust with OPTION_ALLOW_PICKLE=true (option.allow_pickle=true, --allow-pickle)"
        )
    if not pickled:
        raise ArtifactError(f"{uri} holds config.json but no weights (*.safetensors): upload the model's weights")


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)
