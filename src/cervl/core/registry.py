"""One lookup helper for cervl's small registries (name -> class or object), with "did you mean"."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from cervl.core.errors import UnknownName

T = TypeVar("T")


def suggest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    hint = difflib.get_close_matches(str(name), sorted(choices), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def lookup(registry: Mapping[str, T], name: str, kind: str, *, normalize: Callable[[str], str] | None = None) -> T:
    """``registry[name]``, or :class:`~cervl.core.errors.UnknownName` naming the choices and the closest one.

    Only the lookup is guarded: an error raised later, while the caller builds the found class, is
    reported as itself.
    """
    key = normalize(name) if normalize else name
    if key in registry:
        return registry[key]
    raise UnknownName(f"unknown {kind} {name!r} (available: {', '.join(sorted(registry))}){suggest(key, registry)}")
