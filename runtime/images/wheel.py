"""``python runtime/images/wheel.py OUT_DIR [--source ROOT]``: build kiln's serving wheel, holding only the
``artifacts`` and ``runtime`` packages, into OUT_DIR and print its path.

pyproject.toml's wheel lists every kiln package (build, compile, quantize and conf too) because the development
install needs them all. The images must not carry the build side, so this stages a copy of just what serving needs
(``artifacts/``, ``runtime/`` without these image files, ``pyproject.toml``, ``README.md``) and builds from it:
hatchling skips listed packages whose directory is absent. That is hatchling's behaviour, not a promise, so the
wheel's contents are checked afterwards and a wheel holding anything else is refused.

The image builds (``*.Dockerfile``) and ``nox -s slim`` both call this script, so they install the same wheel.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("artifacts", "runtime")
FILES = ("pyproject.toml", "README.md")
IMAGES = Path("runtime") / "images"  # these files: recipes for images, not code the runtime runs
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def stage(source: Path, into: Path) -> None:
    for name in FILES:
        shutil.copy2(source / name, into / name)
    for package in PACKAGES:
        shutil.copytree(source / package, into / package, ignore=SKIP)
    shutil.rmtree(into / IMAGES, ignore_errors=True)


def build_wheel(source: Path, out: Path) -> Path:
    """The wheel built from a staged copy of ``source``; raises SystemExit naming what is wrong."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-wheel-") as tmp:
        staged = Path(tmp) / "src"
        staged.mkdir()
        stage(source, staged)
        before = set(out.glob("kiln-*.whl"))
        pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(out)]
        subprocess.run([*pip, str(staged)], check=True, stdout=subprocess.DEVNULL)
    built = sorted(set(out.glob("kiln-*.whl")) - before) or sorted(out.glob("kiln-*.whl"))
    if len(built) != 1:
        raise SystemExit(f"expected one kiln wheel in {out}, found {[p.name for p in built]}: empty the directory")
    check(built[0])
    return built[0]


def check(wheel: Path) -> None:
    """Refuse a wheel holding more than the serving packages (a hatchling that packs what it was not given)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    extra = sorted(tops - set(PACKAGES)) + sorted(n for n in names if n.startswith(f"{IMAGES.as_posix()}/"))
    if extra or tops != set(PACKAGES):
        raise SystemExit(
            f"{wheel.name} holds {sorted(tops)} (unexpected: {extra}); the serving wheel must hold exactly "
            f"{list(PACKAGES)}: check what hatchling packs from [tool.hatch.build.targets.wheel] in pyproject.toml"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for the wheel")
    parser.add_argument("--source", type=Path, default=ROOT, help="kiln's source tree (default: this checkout)")
    args = parser.parse_args(argv)
    print(build_wheel(args.source.resolve(), args.out.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
