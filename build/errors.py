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
