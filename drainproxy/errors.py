"""The small family of errors library code raises; only the CLI turns them into exit codes."""

from __future__ import annotations


class DrainproxyError(Exception):
    """Base of every error drainproxy raises on purpose."""


class ConfigError(DrainproxyError):
    """A config value breaks a rule; carries the dotted field so the message can name it."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"{field}: {value!r} {rule}")


class LifecycleError(DrainproxyError):
    """An event that is illegal in the current drain phase; the phase is left unchanged."""
