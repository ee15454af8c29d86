"""User-facing build errors: each names the stage, the config key at fault and the fix."""

from __future__ import annotations

from artifacts.errors import StageError


class BuildError(StageError):
    """A build failure the user can act on. ``str()`` is the whole message; no traceback is needed."""

    def __init__(self, stage: str, message: str, *, key: str | None = None, fix: str | None = None) -> None:
        super().__init__(stage, message, key=key, fix=fix)
        self.args = (self.render(),)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        head = f"[{self.stage}]" + (f" {self.key}:" if self.key else "")
        text = f"{head} {self.message}"
        return text + (f"\n  fix: {self.fix}" if self.fix else "")


class ConfigError(BuildError):
    """One or more configuration problems, all reported at once."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [f"  {key}: {msg}" for key, msg in problems]
        super().__init__("config", "invalid configuration:\n" + "\n".join(lines))

    def render(self) -> str:
        return "[config] " + self.message


def as_build_error(exc: BaseException) -> BuildError | None:
    """``exc`` as a BuildError when it is a user-facing stage error, else None (an unexpected crash).

    Stage code outside ``build/`` (``quantize/``, ``compile/``) cannot import BuildError; it raises
    :class:`artifacts.errors.StageError`, which carries the same stage, message, key and fix.
    """
    if isinstance(exc, BuildError):
        return exc
    if isinstance(exc, StageError):
        return BuildError(exc.stage, exc.message, key=exc.key, fix=exc.fix)
    return None
