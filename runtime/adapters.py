"""LoRA adapters while serving: one registry behind every management route (SageMaker's, LMI's, vLLM's) and
every way a request names an adapter.

An adapter is checked before the engine sees it (artifacts/adapters.py: PEFT LoRA, safetensors whose headers
cover the file, rank within ``max_lora_rank``, modules and shapes that fit the served base; an adapter artifact
must also name the served artifact's digest as its base). A local ``src`` must lie under an allowed root; an
artifact URI is pulled and verified like any artifact. A name removed while requests use it disappears at once
for new requests; the engine drops it when the last one using it finishes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from artifacts import ops
from artifacts.adapters import AdapterError, AdapterInfo, base_tensors, check_base, read_adapter
from artifacts.errors import ArtifactError
from artifacts.manifest import MANIFEST_NAME, Manifest
from runtime.engines.base import AdapterRef, Engine, EngineRequestError
from runtime.resolve import names_an_artifact, resolve
from runtime.signatures import Trusted, load_trusted, trusted_signer

log = logging.getLogger("kiln.runtime.adapters")
SAGEMAKER_ROOT = Path("/opt/ml")  # where SageMaker places what it downloads for a container
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class Base:
    """The served model an adapter must fit."""

    name: str
    path: Path
    digest: str | None  # the artifact's digest (None: a plain directory, checked by shapes only)


@dataclass(frozen=True)
class Registered:
    ref: AdapterRef
    src: str
    info: AdapterInfo
    pinned: bool = False
    preloaded: bool = True
    digest: str | None = None  # an adapter artifact's digest

    def describe(self) -> dict[str, object]:
        return {
            "name": self.ref.name,
            "src": self.src,
            "pin": self.pinned,
            "preload": self.preloaded,
            "rank": self.info.rank,
            "alpha": self.info.alpha,
            "target_modules": list(self.info.target_modules),
            "dtype": self.info.dtype,
            **({"digest": self.digest} if self.digest else {}),
        }


class AdapterRequestError(Exception):
    """A management request that cannot be carried out: ``status`` (400, 404, 409) and the reason."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Adapters:
    engine: Engine
    base: Base
    max_rank: int
    roots: tuple[Path, ...]
    allow_pickle: bool = False
    trusted: Trusted = field(default_factory=dict)  # trusted_keys: every adapter must be an artifact they signed
    _by_name: dict[str, Registered] = field(default_factory=dict)
    _in_flight: dict[int, int] = field(default_factory=dict)
    _retired: dict[int, Registered] = field(default_factory=dict)  # unregistered, still used by requests
    _next_id: int = 1
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _base_tensors: dict[str, tuple[tuple[int, ...], str]] | None = None

    @classmethod
    def create(
        cls,
        engine: Engine,
        base: Base,
        max_rank: int,
        roots: Iterable[str],
        allow_pickle: bool = False,
        trusted_keys: Iterable[str] = (),
    ) -> Adapters:
        allowed = (SAGEMAKER_ROOT, base.path / "adapters", *(Path(r).expanduser() for r in roots))
        trusted = load_trusted(trusted_keys)  # the server's start checked these files already
        return cls(engine, base, max_rank, tuple(_real(r) for r in allowed), allow_pickle, trusted)

    # -- lookup --------------------------------------------------------------------------------------------
    def get(self, name: str) -> Registered | None:
        return self._by_name.get(name)

    def all(self) -> list[Registered]:
        return sorted(self._by_name.values(), key=lambda r: r.ref.name)

    def in_use(self, ref: AdapterRef) -> int:
        return self._in_flight.get(ref.id, 0)

    # -- registration ----------------------------------------------------------------------------------------
    async def register(
        self, name: str, src: str, *, preload: bool = True, pin: bool = False, replace: bool = False
    ) -> Registered:
        """Check and load an adapter under ``name``; ``replace`` swaps a registered one (requests using the old
        one finish with it). Raises AdapterRequestError."""
        name, src = (name or "").strip(), (src or "").strip()
        if not name or not src:
            raise AdapterRequestError(400, "name and src are both required", "name" if not name else "src")
        if not NAME_RE.match(name) or name == self.base.name:
            why = "is the base model's name" if name == self.base.name else "is not a valid adapter name"
            raise AdapterRequestError(400, f"{name!r} {why} (letters, digits, . _ - : /; at most 128)", "name")
        if pin and not preload:
            raise AdapterRequestError(400, "Can not set preload to false and pin to true", "pin")
        async with self._lock:
            old = self._by_name.get(name)
            if old is not None and not replace:
                raise AdapterRequestError(409, f"adapter {name!r} is already registered; unregister it first", "name")
            try:
                path, digest, info = await asyncio.to_thread(self._checked, src)
            except (AdapterError, ArtifactError) as exc:
                fix = f"; {exc.fix}" if exc.fix else ""
                raise AdapterRequestError(400, f"adapter {name!r} refused: {exc.message}{fix}", "src") from None
            ref = AdapterRef(name, self._next_id, path, info.rank)
            self._next_id += 1
            if preload:
                try:
                    await self.engine.add_adapter(ref, pin)
                except EngineRequestError as exc:
                    raise AdapterRequestError(400, str(exc), "src") from None
            reg = Registered(ref, src, info, pin, preload, digest)
            self._by_name[name] = reg
            if old is not None:
                await self._retire(old)
        log.info("adapter %s registered from %s (r=%d)", name, src, info.rank)
        return reg

    async def unregister(self, name: str) -> Registered:
        async with self._lock:
            reg = self._by_name.pop(name, None)
            if reg is None:
                raise AdapterRequestError(404, f"The adapter {name} was not found", "name")
            await self._retire(reg)
        log.info("adapter %s unregistered", name)
        return reg

    async def _retire(self, reg: Registered) -> None:
        if self._in_flight.get(reg.ref.id, 0):
            self._retired[reg.ref.id] = reg  # the last request using it removes it (release)
        else:
            await self.engine.remove_adapter(reg.ref)

    # -- requests --------------------------------------------------------------------------------------------
    def acquire(self, ref: AdapterRef) -> bool:
        """Count a request using ``ref``; False when it was unregistered before the request started."""
        current = self._by_name.get(ref.name)
        if (current is None or current.ref.id != ref.id) and ref.id not in self._retired:
            return False
        self._in_flight[ref.id] = self._in_flight.get(ref.id, 0) + 1
        return True

    async def release(self, ref: AdapterRef) -> None:
        left = self._in_flight.get(ref.id, 1) - 1
        if left > 0:
            self._in_flight[ref.id] = left
            return
        self._in_flight.pop(ref.id, None)
        if (reg := self._retired.pop(ref.id, None)) is not None:
            await self.engine.remove_adapter(reg.ref)

    # -- checks ----------------------------------------------------------------------------------------------
    def _checked(self, src: str) -> tuple[Path, str | None, AdapterInfo]:
        path, manifest = self._locate(src)
        info = read_adapter(path, allow_pickle=self.allow_pickle)
        if info.rank > self.max_rank:
            raise AdapterError(
                f"its rank r={info.rank} is greater than max_lora_rank={self.max_rank}",
                fix=f"start the server with max_lora_rank>={info.rank} (SM_VLLM_MAX_LORA_RANK)",
            )
        if manifest is not None and manifest.adapter is not None:
            self._check_artifact_base(manifest)
        if self._base_tensors is None:
            self._base_tensors = base_tensors(self.base.path)
        check_base(info, self._base_tensors, self.base.name)
        return path, manifest.digest if manifest else None, info

    def _check_artifact_base(self, manifest: Manifest) -> None:
        assert manifest.adapter is not None
        base = manifest.adapter["base"]
        if self.base.digest is not None and base.get("digest") != self.base.digest:
            raise AdapterError(
                f"it was built for base {base.get('name')}@{base.get('digest')}, and this server serves "
                f"{self.base.name}@{self.base.digest}",
                fix="build the adapter for this base (python -m build model=… adapter.source=…)",
            )

    def _locate(self, src: str) -> tuple[Path, Manifest | None]:
        """A local directory (under an allowed root, verified when it holds a manifest) or an artifact URI."""
        local = Path(src).expanduser()
        try:
            if local.exists() or src.startswith(("/", "./", "../", "~")):
                return self._local(local, src)
        except (OSError, ValueError) as exc:  # a path the OS will not look up: too long, or a NUL byte in it
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AdapterError(f"src is not a usable path ({why})") from None
        if src.startswith("s3://") and not names_an_artifact(src):
            raise AdapterError(
                f"{src} is an S3 prefix; an s3:// src must name a kiln adapter artifact (…/<name>:<tag> or "
                "…/<name>@sha256:…)",
                fix="build one with python -m build adapter.source=…, or download the adapter and pass its directory",
            )
        model = resolve(src)
        if model.manifest is None or model.manifest.adapter is None:
            raise AdapterError(f"{src} names a model artifact, not a LoRA adapter artifact")
        if self.trusted:
            refresh = model.refresh_signatures if model.ref is not None else None
            trusted_signer(model.path, model.manifest, self.trusted, f"adapter {src}", refresh)
        return model.path, model.manifest

    def _local(self, path: Path, src: str) -> tuple[Path, Manifest | None]:
        real = _real(path)
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            raise AdapterError(
                f"{src} is outside the directories adapters may be loaded from ({', '.join(map(str, self.roots))})",
                fix="add its parent directory to adapter_roots (option.adapter_roots), or pass an adapter artifact URI",
            )
        if not real.is_dir():
            raise AdapterError(f"{src}: no such directory")
        if not (real / MANIFEST_NAME).is_file():
            if self.trusted:  # a plain PEFT directory has nothing to sign
                trusted_signer(real, None, self.trusted, f"adapter {src} (a plain PEFT directory)")
            return real, None
        manifest = ops.read_dir_manifest(real)
        ops.verify_dir(real, manifest)  # VerificationError names the first damaged file
        if self.trusted:
            trusted_signer(real, manifest, self.trusted, f"adapter {src}")
        return real, manifest


def _real(path: Path) -> Path:
    return Path(path).expanduser().resolve()
