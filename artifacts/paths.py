"""Where kiln keeps things on this machine. Nothing here defaults to the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$KILN_CACHE``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln``."""
    if env := os.environ.get("KILN_CACHE"):
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "kiln"


def default_store_uri() -> str:
    """``$KILN_STORE`` (a path or a store URI), else the local store under :func:`cache_root`."""
    from artifacts.uri import normalize_store_uri

    env = os.environ.get("KILN_STORE")
    return normalize_store_uri(env) if env else "file://" + str(cache_root() / "store")


def pull_cache_root() -> Path:
    """Where the runtime materializes pulled artifacts, keyed by digest."""
    return cache_root() / "pulled"
