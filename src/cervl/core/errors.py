"""Exception types for errors a user can fix (bad config, bad data, bad input file).

``cervl.cli`` prints a :class:`UserError` as one ``error:`` line and exits 2; any other exception is a
bug and keeps its traceback. The concrete types also derive from the built-in type a caller would
expect (``ValueError``, ``KeyError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error in user input; the message says what is wrong and where."""


class InvalidInput(UserError, ValueError):
    """A value, file or option that cervl cannot use."""


class UnknownName(UserError, KeyError):
    """A name missing from a registry (label set, prompt style, dataset, detector...)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class MissingResource(UserError, RuntimeError):
    """A model file or package a feature needs is not installed or not found."""


class ConfigError(InvalidInput):
    """A bad config key or value; the message names the key path (re-exported by :mod:`cervl.train.config`)."""
