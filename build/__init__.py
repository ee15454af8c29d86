"""kiln build: the Hydra app that turns a checkpoint into a verified artifact (``python -m build``).

Nothing here imports Hydra at package import: stage code runs in toolchain environments that lack it.
"""
