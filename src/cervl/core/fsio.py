"""Replacing a whole folder so that a kill at any moment leaves one complete copy (checkpoints, ``final/``,
the tiny base)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cervl.core.faults import crash_point


def swap_in(new: Path, target: Path, old: Path, *, crash: str | None = None) -> None:
    """Put the complete folder ``new`` in place of ``target`` by renames: ``target`` -> ``old``, ``new`` ->
    ``target``, then ``old`` is removed. Between the renames only ``old`` exists, complete, and readers and
    the next writer know to use it. ``old`` must be a name the caller owns; ``crash`` names the fault-injection
    point between the renames (:mod:`cervl.core.faults`)."""
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        if crash:
            crash_point(crash)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` then rename it over ``path``.

    A crash or an error mid-way leaves any previous file intact.
    """
    atomic_write_lines(path, [text])


def atomic_write_lines(path: str | os.PathLike, chunks: Iterable[str]) -> None:
    """:func:`atomic_write_text` for text given piece by piece (memory does not grow with the file)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600: keep the mode of the file being replaced, or give a new file the umask's
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else new_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode a new file gets under the umask (``mkstemp`` would give 0600)."""
    mask = os.umask(0)  # the only portable way to read it; set straight back
    os.umask(mask)
    return 0o666 & ~mask


__all__ = ["atomic_write_lines", "atomic_write_text", "new_file_mode", "swap_in"]
