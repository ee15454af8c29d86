"""``python -m tests.fake_serve serve DIR --engine fake …``: ``python -m runtime`` with the fake engine registered,
for tests that need a real server process (signals, exit codes) without a real engine's start-up time."""

from __future__ import annotations

import sys

from runtime import engines
from runtime.__main__ import run

if __name__ == "__main__":
    engines.register("fake", "tests.fake_engine")
    sys.exit(run())
