"""Replacing a whole folder so that a kill at any moment leaves one complete copy (checkpoints, ``final/``,
the tiny base)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cervl.faults import crash_point


def swap_in(new: Path, target: Path, old: Path, *, crash: str | None = None) -> None:
    """Put the complete folder ``new`` in place of ``target`` by renames: ``target`` -> ``old``, ``new`` ->
    ``target``, then ``old`` is removed. Between the renames only ``old`` exists, complete, and readers and
    the next writer know to use it. ``old`` must be a name the caller owns; ``crash`` names the fault-injection
    point between the renames (:mod:`cervl.faults`)."""
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        if crash:
            crash_point(crash)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["swap_in"]
