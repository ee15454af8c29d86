"""The serving configuration: one model, one precedence, validated once, every value traced to its source.

``schema`` (the settings), ``aliases`` (LMI/vLLM/TGI/SageMaker names), ``sources`` (readers), ``merge``
(precedence and normalization), ``validate`` (types, pass-through keys, the target block), ``location`` (where the
model is), ``render`` (``python -m runtime config``).
"""

from runtime.config.location import Location, is_hub_id, locate, redirect
from runtime.config.merge import PartialConfigError, resolve_config
from runtime.config.render import as_json, render
from runtime.config.schema import FIELDS, ConfigError, Entry, Origin, Resolved, ServeConfig
from runtime.config.sources import (
    Sources,
    artifact_entries,
    cli_entries,
    properties_in,
    read_env,
    read_properties,
)

__all__ = [
    "FIELDS",
    "ConfigError",
    "Entry",
    "Location",
    "Origin",
    "PartialConfigError",
    "Resolved",
    "ServeConfig",
    "Sources",
    "artifact_entries",
    "as_json",
    "cli_entries",
    "is_hub_id",
    "locate",
    "properties_in",
    "read_env",
    "read_properties",
    "redirect",
    "render",
    "resolve_config",
]
