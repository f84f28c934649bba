"""FACS action units and the prototypical AU sets of basic and compound expressions.

The prototypes follow Du, Tao & Martinez, "Compound facial expressions of emotion", PNAS 2014
(Table 1): for each category, the AUs used by most subjects ("required") and AUs used by a
sizeable minority, with the fraction of subjects who used them ("optional", probability).
They drive the SynthCE generator and ground the class definitions of the ``context`` prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# AU number -> short FACS name, and the visible change it produces (used in prompts and AU captions).
AUS: dict[int, tuple[str, str]] = {
    1: ("inner brow raiser", "inner brows raised"),
    2: ("outer brow raiser", "outer brows raised"),
    4: ("brow lowerer", "brows lowered and drawn together"),
    5: ("upper lid raiser", "upper eyelids raised, eyes wide"),
    6: ("cheek raiser", "cheeks raised with crow's feet"),
    7: ("lid tightener", "eyelids tightened"),
    9: ("nose wrinkler", "nose wrinkled"),
    10: ("upper lip raiser", "upper lip raised"),
    11: ("nasolabial deepener", "nasolabial folds deepened"),
    12: ("lip corner puller", "lip corners pulled up"),
    15: ("lip corner depressor", "lip corners pulled down"),
    17: ("chin raiser", "chin raised, lower lip pushed up"),
    20: ("lip stretcher", "lips stretched sideways"),
    23: ("lip tightener", "lips tightened"),
    24: ("lip pressor", "lips pressed together"),
    25: ("lips part", "lips parted"),
    26: ("jaw drop", "jaw dropped"),
}
AU_IDS: tuple[int, ...] = tuple(AUS)


def au_key(au: int) -> str:
    """Column name used in files and manifests, e.g. ``AU04``."""
    return f"AU{au:02d}"


@dataclass(frozen=True)
class Prototype:
    """Required AUs and optional AUs with the probability that each is present."""

    required: tuple[int, ...]
    optional: dict[int, float] = field(default_factory=dict)


PROTOTYPES: dict[str, Prototype] = {
    "Neutral": Prototype(()),
    "Happiness": Prototype((12, 25), {6: 0.51}),
    "Sadness": Prototype((4, 15), {1: 0.60, 6: 0.50, 11: 0.26, 17: 0.67}),
    "Fear": Prototype((1, 4, 20, 25), {2: 0.57, 5: 0.63, 26: 0.33}),
    "Anger": Prototype((4, 7, 24), {10: 0.26, 17: 0.52, 23: 0.29}),
    "Surprise": Prototype((1, 2, 25, 26), {5: 0.66}),
    "Disgust": Prototype((9, 10, 17), {4: 0.31, 24: 0.26}),
    "Happily Surprised": Prototype((1, 2, 12, 25), {5: 0.64, 26: 0.67}),
    "Happily Disgusted": Prototype((10, 12, 25), {4: 0.32, 6: 0.61, 9: 0.59}),
    "Sadly Fearful": Prototype((1, 4, 20, 25), {2: 0.46, 5: 0.24, 6: 0.34, 15: 0.30}),
    "Sadly Angry": Prototype((4, 15), {6: 0.26, 7: 0.48, 11: 0.20, 17: 0.50}),
    "Sadly Surprised": Prototype((1, 4, 25, 26), {2: 0.27, 6: 0.31}),
    "Sadly Disgusted": Prototype((4, 10), {1: 0.49, 6: 0.61, 9: 0.20, 11: 0.35, 15: 0.54, 17: 0.47, 25: 0.43}),
    "Fearfully Angry": Prototype((4, 20, 25), {5: 0.40, 7: 0.39, 10: 0.30, 11: 0.33}),
    "Fearfully Surprised": Prototype((1, 2, 5, 20, 25), {4: 0.47, 10: 0.35, 11: 0.22, 26: 0.51}),
    "Angrily Surprised": Prototype((4, 25, 26), {5: 0.35, 7: 0.50, 10: 0.34}),
    "Angrily Disgusted": Prototype((4, 10, 17), {7: 0.60, 9: 0.57, 24: 0.36}),
    "Disgustedly Surprised": Prototype((1, 2, 5, 10), {9: 0.37, 17: 0.35, 24: 0.45, 26: 0.79}),
}


def describe_aus(aus: dict[int, float], threshold: float = 0.3) -> str:
    """A short caption of the AUs at or above ``threshold``, in AU-number order (a canonical target)."""
    active = sorted(a for a, v in aus.items() if v >= threshold)
    if not active:
        return "relaxed face, no action units"
    return ", ".join(AUS[a][1] for a in active)
