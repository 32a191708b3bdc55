"""The one error type for bad configuration, raised before any process group exists."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad flags, model JSON or data JSON. ``problems`` lists every problem found, each naming the
    flag or JSON key, the value given and what would be valid."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)
