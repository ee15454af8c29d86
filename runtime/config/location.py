"""Where the model is, before any configuration file is read: the ``serve`` argument, else the container's
variables (``OPTION_MODEL_ID``, ``HF_MODEL_ID``), else SageMaker's model directory; and LMI's redirect through a
``serving.properties`` that names the model with ``option.model_id``.

A model found through the container's configuration (the variables or ``/opt/ml/model``) puts the server in
*container mode*: it listens on 0.0.0.0:8080 as LMI does, unless ``--host``/``OPTION_HOST``/``SERVING_HOST`` say
otherwise. A model named on the command line is served on loopback (a terminal).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from runtime.config.schema import SAGEMAKER_MODEL_DIR, Entry, Origin

# A Hugging Face hub repository id: "<owner>/<name>" (letters, digits, '.', '_', '-'), nothing else.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
CONTAINER_VARS = ("OPTION_MODEL_ID", "HF_MODEL_ID")


@dataclass(frozen=True)
class Location:
    target: str  # what to resolve: artifact URI, directory, or hub id
    origin: Origin
    container: bool  # the model came from the container's configuration: listen on 0.0.0.0:8080
    sagemaker: bool = False  # nothing named a model: SageMaker's model directory


def locate(cli_model: str | None, env: Mapping[str, str]) -> Location:
    """The argument, then the environment, then SageMaker's model directory ($SM_MODEL_DIR or /opt/ml/model)."""
    if cli_model:
        return Location(cli_model, Origin("cli", "MODEL argument"), container=False)
    for name in CONTAINER_VARS:
        if env.get(name):
            return Location(env[name], Origin("env", name), container=True)
    sm = env.get("SM_MODEL_DIR") or SAGEMAKER_MODEL_DIR
    origin = Origin("env" if env.get("SM_MODEL_DIR") else "default", "SM_MODEL_DIR")
    return Location(sm, origin, container=True, sagemaker=True)


def is_hub_id(target: str) -> bool:
    """``meta-llama/Llama-3.1-8B`` is a hub id; a path that exists, a URI or ``./x/y`` is not."""
    return bool(HUB_ID_RE.match(target)) and not Path(target).expanduser().exists()


def redirect(location: Location, props: list[Entry]) -> Location:
    """LMI: a model directory holding no model but a serving.properties that names one with option.model_id (an
    artifact URI, another directory or a hub id) points there. A directory with weights is the model itself."""
    d = Path(location.target).expanduser()
    if (d / "manifest.json").is_file() or (d / "config.json").is_file():
        return location
    for e in props:
        if e.key == "model_id" and e.value:
            return replace(location, target=str(e.value), origin=e.origin)
    return location
