"""The exit codes of ``python -m runtime serve``, which ``python -m runtime supervise`` reads to decide whether a
restart can help.

A failure a restart may cure (the engine died, a store or the network failed, the port was taken) exits 1. A
failure no restart can cure (a bad setting, a model that is not there or does not verify, an artifact built for
another host) exits ``EX_CONFIG``, so a supervisor gives up at once instead of loading the model again to hit the
same error.
"""

from __future__ import annotations

EX_OK = 0
EX_FAILURE = 1  # the engine died, or a store, the network or the disk failed: a restart may help
EX_USAGE = 2  # argparse's code for a command line it cannot parse
EX_CONFIG = 78  # sysexits.h's "configuration error": the same start would fail the same way
PERMANENT = frozenset({EX_USAGE, EX_CONFIG})
