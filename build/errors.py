"""User-facing build errors: each names the stage, the config key at fault and the fix."""

from __future__ import annotations


class BuildError(Exception):
    """A build failure the user can act on. ``str()`` is the whole message; no traceback is needed."""

    def __init__(self, stage: str, message: str, *, key: str | None = None, fix: str | None = None) -> None:
        self.stage = stage
        self.key = key
        self.fix = fix
        self.message = message
        super().__init__(self.render())

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

    Stage code outside ``build/`` (``quantize/``, ``compile/``) cannot import BuildError; it raises its own
    exception class marked ``user_facing = True`` with ``stage``, ``message``, ``key`` and ``fix`` attributes.
    """
    if isinstance(exc, BuildError):
        return exc
    if getattr(exc, "user_facing", False):
        return BuildError(
            str(getattr(exc, "stage", "stage")),
            str(getattr(exc, "message", exc)),
            key=getattr(exc, "key", None),
            fix=getattr(exc, "fix", None),
        )
    return None
