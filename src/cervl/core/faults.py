"""One fault-injection point, for crash-safety tests and for users who want to drill a crash.

``CERVL_CRASH_AT=<point>`` makes the process kill itself with SIGKILL, as ``kill -9`` or a lost node would,
when it reaches that point:

* ``checkpoint:<step>``: right after the training checkpoint of global step ``<step>`` is written;
* ``final-swap``: between the two renames that swap a new ``final/`` in (:func:`cervl.run.save_final`).

Unset (always, outside such tests), a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """SIGKILL this process if ``CERVL_CRASH_AT`` names this point."""
    if os.environ.get("CERVL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["crash_point"]
