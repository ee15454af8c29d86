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


if __name__ == "__main__":
    main()
