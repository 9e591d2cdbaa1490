"""The small family of errors library code raises; only the CLI turns them into exit codes."""

from __future__ import annotations

from collections.abc import Iterable


class _Hidden:
    """Stands in for a secret value (the admin token) in every message."""

    def __repr__(self) -> str:
        return "<hidden>"


HIDDEN = _Hidden()


class DrainproxyError(Exception):
    """Base of every error drainproxy raises on purpose."""


class ConfigError(DrainproxyError):
    """A config value breaks a rule; carries the dotted field so the message can name it.

    The value is shown as written: durations print as ``30s`` (their ``repr``)."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"{field}: {value!r} {rule}")

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Each single error this one stands for."""
        return (self,)

    def hidden(self) -> ConfigError:
        """The same error with the value masked (for secrets such as ``admin.token``)."""
        return ConfigError(self.field, HIDDEN, self.rule)


class ConfigErrors(ConfigError):
    """Every error one reading of a config found; ``field``, ``value`` and ``rule`` are the
    first's, ``str()`` lists them all, one per line."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self._errors = tuple(error for many in errors for error in many.errors)
        first = self._errors[0]
        super().__init__(first.field, first.value, first.rule)
        self.args = ("\n".join(str(error) for error in self._errors),)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._errors

    def __str__(self) -> str:
        return str(self.args[0])


class LifecycleError(DrainproxyError):
    """An event that is illegal in the current drain phase; the phase is left unchanged."""
