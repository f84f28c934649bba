"""How cervl starts worker processes: one place for the start method and what a failed start means.

Workers are *spawned*, never forked: forking a process that has used torch's thread pool can
deadlock. A spawned child normally imports the parent's ``__main__`` module again, which runs an
unguarded user script a second time and stops the child with "An attempt has been made to start a
new process before the current process has finished its bootstrapping phase". cervl's workers run
only cervl's own functions on plain data, so :func:`start_workers` hides the main script while they
start, and a script that calls cervl without ``if __name__ == "__main__":`` works too.

Workers ignore Ctrl-C (:func:`ignore_interrupts`): the parent alone stops, cleans up and says what
was kept, instead of every child printing its own traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class WorkersDied(RuntimeError):
    """Every worker process ended before the work was done (crash, out of memory, killed)."""


@contextmanager
def start_workers() -> Iterator[mp.context.BaseContext]:
    """The spawn context, with the main script hidden from children started inside this block."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if "__file__" in saved:
            del main.__file__
        if "__spec__" in saved:
            main.__spec__ = None
        yield mp.get_context("spawn")
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def ignore_interrupts(*_args) -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def died_message(procs: list, what: str) -> str:
    """Why every worker is gone, for :class:`WorkersDied`: their exit codes and the usual causes."""
    codes = sorted({p.exitcode for p in procs})
    signals = [f"signal {-c}" for c in codes if c is not None and c < 0]
    return (f"all {len(procs)} worker processes died before {what} (exit codes {codes}"
            + (f": killed by {', '.join(signals)}, e.g. the out-of-memory killer" if signals else "")
            + "); run with workers=1 to see the error in this process")


__all__ = ["WorkersDied", "died_message", "ignore_interrupts", "start_workers"]
