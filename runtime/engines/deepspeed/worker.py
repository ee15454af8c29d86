"""A tensor-parallel rank above 0 of the deepspeed engine: ``python -m runtime.engines.deepspeed.worker``.

The server (rank 0) starts one per extra rank with torch.distributed's variables and its settings in
``KILN_DEEPSPEED_SETTINGS``. The rank loads and shards the same model, joins the process group and runs its own
batching manager, which takes its requests from the driver's broadcasts. It exits when the driver stops (the stop
reaches every rank's manager) or when the server process is gone.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from runtime.engines.deepspeed.engine import SETTINGS_ENV, DeepSpeedEngine, settings_from_json

log = logging.getLogger("kiln.runtime.deepspeed.worker")
POLL_S = 0.5


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=f"rank {os.environ.get('RANK', '?')}: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    engine = DeepSpeedEngine(
        settings_from_json(os.environ[SETTINGS_ENV]), rank=int(os.environ["RANK"]), port=int(os.environ["MASTER_PORT"])
    )
    engine._build()
    parent = int(os.environ.get("KILN_PARENT_PID", "0"))
    manager = engine._manager
    while manager.is_running():
        if parent and os.getppid() != parent:  # the server died without stopping: nothing will stop this rank
            log.error("the server process is gone; exiting")
            os._exit(1)
        time.sleep(POLL_S)
    error = manager.background_thread_status.fatal_error
    manager.stop(block=True, timeout=10.0)
    if error is not None:
        log.error("the generation loop failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
