"""Toolchains: the environments stage work runs in, because stage libraries cannot share one environment.

Each toolchain is a pinned requirements file beside this module (``<name>.txt``; pip option lines such as
``--extra-index-url`` name where its packages come from). A stage declares the
toolchain it needs; :func:`resolve` finds an interpreter for it, in this order:

1. ``KILN_TOOLCHAIN_<NAME>`` (e.g. ``KILN_TOOLCHAIN_VLLM_CPU=/opt/venv/bin/python``): a container image or a
   cluster node provides the environment.
2. The current interpreter, when it already satisfies every pin: the stage runs in-process.
3. A project-managed virtual environment under ``$KILN_TOOLCHAINS_DIR/<name>-<lock digest>`` (default
   ``<kiln cache>/toolchains``), created on
   first use with pip (which finds the CPU torch wheel on this machine's disk).

Adding a toolchain is adding ``<name>.txt`` here. Directives in its comments: ``# kiln: uninstall PKG…`` (removed
after install), ``# kiln: extra-index-url URL`` (a vendor's own package index, e.g. AWS's Neuron index, probed before
anything is built: see :func:`preflight`) and ``# kiln: provided-by TEXT`` (where a ready environment comes from, for
the fix of an install failure).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from artifacts.paths import cache_root
from build.errors import BuildError

log = logging.getLogger("kiln.build.toolchains")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Toolchain:
    name: str
    requirements: Path

    @property
    def pins(self) -> dict[str, str]:
        """Package name (normalized) → exact pinned version."""
        pins = {}
        for line in self.requirements.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("-"):  # a pip option (--extra-index-url …): where packages come from, not a pin
                continue
            if line:
                name, sep, version = line.partition("==")
                if not sep:
                    raise ValueError(f"{self.requirements}: {line!r} is not pinned with ==")
                pins[_norm(name)] = version.strip()
        return pins

    def directive(self, name: str) -> list[str]:
        """The values of ``# kiln: <name> VALUE`` lines, in order."""
        prefix = f"# kiln: {name} "
        lines = self.requirements.read_text().splitlines()
        return [line.removeprefix(prefix).strip() for line in lines if line.startswith(prefix)]

    @property
    def post_uninstall(self) -> list[str]:
        """Packages to remove after install (``# kiln: uninstall a b``): dependencies that break the env."""
        return [pkg for line in self.directive("uninstall") for pkg in line.split()]

    @property
    def extra_index_urls(self) -> list[str]:
        """Package indexes pip searches beside PyPI (``# kiln: extra-index-url URL``)."""
        return self.directive("extra-index-url")

    def fix(self) -> str:
        """What to do when this toolchain cannot be created here."""
        where = "".join(f" ({p})" for p in self.directive("provided-by"))
        return f"set {env_var(self.name)} to a python that has {self.requirements.name}'s packages{where}"

    @property
    def lock_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.requirements.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Interpreter:
    python: str
    in_process: bool
    origin: str


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


TOOLCHAINS: dict[str, Toolchain] = {p.stem: Toolchain(p.stem, p) for p in sorted(HERE.glob("*.txt"))}


def get(name: str) -> Toolchain:
    try:
        return TOOLCHAINS[name]
    except KeyError:
        raise BuildError("toolchain", f"unknown toolchain {name!r}; known: {sorted(TOOLCHAINS)}") from None


def env_var(name: str) -> str:
    return "KILN_TOOLCHAIN_" + name.upper().replace("-", "_")


def mismatches(tc: Toolchain) -> list[str]:
    """Pins the current environment does not satisfy (empty: it satisfies them all)."""
    out = []
    for pkg, version in tc.pins.items():
        try:
            have = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} (missing)")
            continue
        if have != version:
            out.append(f"{pkg} {have} (needs {version})")
    return out


def installed_versions(packages: Iterable[str]) -> dict[str, str]:
    """Versions of ``packages`` (and of Python) in this interpreter, for provenance."""
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "missing"
    versions["python"] = platform.python_version()
    return versions


def resolve(tc: Toolchain, *, create: bool = True) -> Interpreter:
    """The interpreter ``tc``'s stages run in; ``create=False`` names a managed one without creating it."""
    if python := os.environ.get(env_var(tc.name)):
        return Interpreter(python=python, in_process=False, origin=env_var(tc.name))
    if not mismatches(tc):
        return Interpreter(python=sys.executable, in_process=True, origin="current")
    managed = ensure_managed(tc) if create else managed_dir(tc) / "bin" / "python"
    return Interpreter(python=str(managed), in_process=False, origin="managed")


def host_fingerprint(tc: Toolchain) -> dict[str, str]:
    """What a host-bound stage's output (machine code) depends on besides its inputs: this CPU, and the
    interpreter the stage runs in (compiled kernels are keyed by its install paths). Starts no process."""
    return {"machine": platform.machine(), "cpu": _cpu_id(), "python": resolve(tc, create=False).python}


def _cpu_id() -> str:
    """The CPU model and a digest of its feature flags (what ``-march=native`` compiles for)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return platform.processor() or "unknown"
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    flags = " ".join(sorted(fields.get("flags", fields.get("Features", "")).split()))
    return f"{fields.get('model name', 'unknown')} [{hashlib.sha256(flags.encode()).hexdigest()[:16]}]"


def managed_root() -> Path:
    """``$KILN_TOOLCHAINS_DIR``, else ``<kiln cache>/toolchains`` (environments are large; tests share them)."""
    env = os.environ.get("KILN_TOOLCHAINS_DIR")
    return Path(env).expanduser().resolve() if env else cache_root() / "toolchains"


def managed_dir(tc: Toolchain) -> Path:
    return managed_root() / f"{tc.name}-{tc.lock_digest.split(':')[1][:12]}"


def preflight(tc: Toolchain) -> None:
    """Fail now, before any stage runs, when ``tc`` would have to be created and a package index it needs cannot be
    reached: pip would retry each unreachable index for minutes, after the stages before it had run."""
    if os.environ.get(env_var(tc.name)) or (managed_dir(tc) / ".kiln-complete").exists() or not mismatches(tc):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "PIP_PROXY")):
        return  # pip goes through the proxy: a direct connection says nothing
    for url in tc.extra_index_urls:
        if (why := unreachable(url)) is not None:
            missing = ", ".join(m.split(" ")[0] for m in mismatches(tc)[:4])
            raise BuildError(
                "toolchain",
                f"the {tc.name!r} toolchain needs {missing} … from {url}, which this machine cannot reach ({why}); "
                "nothing was built or published",
                fix=f"build on a host that reaches {url}, or {tc.fix()}",
            )


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to ``url``'s host fails (None: it connects)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def ensure_managed(tc: Toolchain) -> Path:
    """Create (once, under a lock) the toolchain's virtual environment; return its python."""
    venv = managed_dir(tc)
    python = venv / "bin" / "python"
    done = venv / ".kiln-complete"
    if done.exists():
        return python
    preflight(tc)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        print(
            f"kiln: creating toolchain environment {tc.name!r} in {venv} (first use; this can take minutes)",
            file=sys.stderr,
        )
        # pip's output is the progress on a terminal; on a pipe it is held back (shown if it fails) so the
        # build's log stays quiet, unless KILN_LOG_LEVEL=DEBUG asks for it.
        loud = sys.stderr.isatty() or os.environ.get("KILN_LOG_LEVEL", "").upper() == "DEBUG"
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        indexes = [arg for url in tc.extra_index_urls for arg in ("--extra-index-url", url)]
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [*pip, "install", "--progress-bar", "on" if loud else "off", *indexes, "-r", str(tc.requirements)],
        ]
        if tc.post_uninstall:
            steps.append([*pip, "uninstall", "-y", *tc.post_uninstall])
        for step in steps:
            proc = subprocess.run(
                step,
                stdout=sys.stderr if loud else subprocess.PIPE,
                stderr=None if loud else subprocess.STDOUT,
                text=True,
            )
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = "" if loud else "\n" + "\n".join((proc.stdout or "").splitlines()[-20:])
                raise BuildError(
                    "toolchain",
                    f"creating the {tc.name!r} environment failed: {' '.join(step[:4])} … exited {proc.returncode}"
                    + tail,
                    fix=f"check network access to the package index{'es' if indexes else ''} "
                    f"({', '.join(['PyPI', *tc.extra_index_urls])}), or {tc.fix()}",
                )
        done.touch()
    return python
