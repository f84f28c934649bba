"""Shared plot conventions: one colour per class that stays distinct for 11+ classes, legends outside.

Matplotlib's default cycle has 10 colours, so an 11-class label set drew "Happily Surprised" and
"Disgustedly Surprised" in the same blue. Every cervl plot that draws classes takes its colours here.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

# tab10, then black, gold, navy and olive green: 14 colours a reader can tell apart on white.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#e6ab02", "#000080", "#66a61e")


def class_style(i: int) -> dict:
    """Colour (and past the palette, a dash pattern) of the ``i``-th class: never two alike."""
    dashes = ("-", "--", ":", "-.")
    return {"color": PALETTE[i % len(PALETTE)], "linestyle": dashes[(i // len(PALETTE)) % len(dashes)]}


def legend_outside(ax, **kwargs) -> None:
    """The legend to the right of the axes, so that it never covers data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=False, **kwargs)


__all__ = ["PALETTE", "class_style", "legend_outside"]
