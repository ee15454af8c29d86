"""``python -m build [overrides…]`` — build an artifact; the last stdout line is its URI."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from build.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="build")
def main(cfg: DictConfig) -> None:
    from build.cli import main as run

    code = run(cfg)
    if code:
        sys.exit(code)


def _refuse_build_prefix(args: list[str]) -> None:
    """``build.force=true`` (as some notes spell it) would die in Hydra's parser with a misleading hint; the build's
    keys have no ``build.`` prefix (the whole config is the build), so name the key and the spelling that works."""
    for arg in args:
        key = arg.lstrip("+~").partition("=")[0]
        if key.startswith("build."):
            fixed = arg.replace("build.", "", 1)
            print(
                f"kiln build failed: [config] {key}: build keys have no 'build.' prefix; use {fixed}", file=sys.stderr
            )
            sys.exit(1)


if __name__ == "__main__":
    _refuse_build_prefix(sys.argv[1:])
    main()
