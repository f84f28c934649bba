"""Label taxonomies: canonical class names, compound components and dataset label sets.

Canonical names are used everywhere (manifests, prompts, predictions, reports). Dataset
label ids only exist at the edges, inside the readers, and are mapped through a
:class:`LabelSet`.

>>> get_label_set("rafdb-basic").id_to_name[4]
'Happiness'
>>> resolve_name("happily-surprised")
'Happily Surprised'
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property

from cervl.core.errors import UnknownName
from cervl.core.registry import lookup

# Basic emotions (the six of Ekman plus Neutral), then the two extra classes some datasets use.
BASIC: tuple[str, ...] = ("Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger")
EXTRA_BASIC: tuple[str, ...] = ("Contempt", "Other")

# RAF-DB compound classes, in RAF-DB's label-id order (ids 1-11).
COMPOUND: tuple[str, ...] = (
    "Happily Surprised",
    "Happily Disgusted",
    "Sadly Fearful",
    "Sadly Angry",
    "Sadly Surprised",
    "Sadly Disgusted",
    "Fearfully Angry",
    "Fearfully Surprised",
    "Angrily Surprised",
    "Angrily Disgusted",
    "Disgustedly Surprised",
)

# C-EXPR-DB / ABAW compound-expression challenge classes, in the official index order 0-6.
CEXPR: tuple[str, ...] = (
    "Fearfully Surprised",
    "Happily Surprised",
    "Sadly Surprised",
    "Disgustedly Surprised",
    "Angrily Surprised",
    "Sadly Fearful",
    "Sadly Angry",
)

ALL_CLASSES: tuple[str, ...] = BASIC + EXTRA_BASIC + COMPOUND

# Words of a compound name -> the basic emotion they denote.
_WORD_TO_BASIC = {
    "happily": "Happiness",
    "sadly": "Sadness",
    "fearfully": "Fear",
    "angrily": "Anger",
    "disgustedly": "Disgust",
    "surprised": "Surprise",
    "disgusted": "Disgust",
    "fearful": "Fear",
    "angry": "Anger",
}

# Common spellings of basic classes found in dataset folders and free text.
_ALIASES = {
    "happy": "Happiness",
    "happiness": "Happiness",
    "joy": "Happiness",
    "sad": "Sadness",
    "sadness": "Sadness",
    "surprise": "Surprise",
    "surprised": "Surprise",
    "fear": "Fear",
    "fearful": "Fear",
    "scared": "Fear",
    "disgust": "Disgust",
    "disgusted": "Disgust",
    "anger": "Anger",
    "angry": "Anger",
    "neutral": "Neutral",
    "contempt": "Contempt",
    "other": "Other",
}


def normalize_name(text: str) -> str:
    """Lower-case, turn hyphens/underscores into spaces and collapse whitespace."""
    return re.sub(r"\s+", " ", re.sub(r"[-_]+", " ", str(text))).strip().lower()


_NORMALIZED = {normalize_name(name): name for name in ALL_CLASSES}
_NORMALIZED.update({k: v for k, v in _ALIASES.items() if k not in _NORMALIZED})


def resolve_name(text: str) -> str | None:
    """Map free text such as ``"happily_surprised"`` to a canonical class name, or None."""
    return _NORMALIZED.get(normalize_name(text))


def is_compound(name: str) -> bool:
    """True for the compound (two-emotion) classes."""
    return name in COMPOUND


def components(name: str) -> tuple[str, str]:
    """The two basic emotions a compound class blends, e.g. ``('Happiness', 'Surprise')``."""
    if name not in COMPOUND:
        raise ValueError(f"{name!r} is not a compound class")
    first, second = normalize_name(name).split(" ")
    return _WORD_TO_BASIC[first], _WORD_TO_BASIC[second]


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of canonical classes plus the dataset's integer ids for them.

    ``classes[i]`` has dataset id ``ids[i]``; the position ``i`` is the model-side index.
    """

    name: str
    classes: tuple[str, ...]
    ids: tuple[int, ...]
    description: str = ""
    unannotated_id: int | None = None  # e.g. -1 in Aff-Wild2: "no label for this frame"

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.ids):
            raise ValueError(f"label set {self.name}: {len(self.classes)} classes but {len(self.ids)} ids")
        unknown = [c for c in self.classes if c not in ALL_CLASSES]
        if unknown:
            raise ValueError(f"label set {self.name}: non-canonical classes {unknown}")

    def __len__(self) -> int:
        return len(self.classes)

    def __contains__(self, name: object) -> bool:
        return name in self.name_to_id

    @cached_property
    def id_to_name(self) -> dict[int, str]:
        return dict(zip(self.ids, self.classes))

    @cached_property
    def name_to_id(self) -> dict[str, int]:
        return dict(zip(self.classes, self.ids))

    @cached_property
    def index_of(self) -> dict[str, int]:
        """Canonical name -> position 0..K-1 (the index used by models and metrics)."""
        return {c: i for i, c in enumerate(self.classes)}

    def name_for_id(self, label_id: int) -> str:
        """Dataset id -> canonical name; raises ``KeyError`` with the valid ids."""
        try:
            return self.id_to_name[int(label_id)]
        except KeyError:
            raise UnknownName(f"unknown label id {label_id} for label set {self.name!r} (valid: {list(self.ids)})") from None

    def resolve(self, text: str) -> str:
        """Tolerant free text -> a canonical class of *this* set; raises ``KeyError`` otherwise."""
        name = resolve_name(text)
        if name is None or name not in self:
            hint = difflib.get_close_matches(normalize_name(text), [normalize_name(c) for c in self.classes], n=1)
            suggestion = f"; did you mean {_NORMALIZED[hint[0]]!r}?" if hint else ""
            raise UnknownName(f"{text!r} is not a class of label set {self.name!r} {list(self.classes)}{suggestion}")
        return name


def _make(name: str, classes: tuple[str, ...], first_id: int, description: str, **kw) -> LabelSet:
    return LabelSet(name, classes, tuple(range(first_id, first_id + len(classes))), description, **kw)


LABEL_SETS: dict[str, LabelSet] = {
    s.name: s
    for s in (
        _make(
            "rafdb-basic",
            ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"),
            1,
            "RAF-DB basic emotions, ids 1-7 as in list_patition_label.txt",
        ),
        _make("rafdb-compound", COMPOUND, 1, "RAF-DB compound emotions, ids 1-11"),
        _make(
            "affwild2-expr",
            ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other"),
            0,
            "Aff-Wild2 EXPR track, ids 0-7; -1 marks unannotated frames",
            unannotated_id=-1,
        ),
        _make("cexprdb", CEXPR, 0, "C-EXPR-DB / ABAW compound-expression challenge, official indices 0-6"),
        _make(
            "affectnet-8",
            ("Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger", "Contempt"),
            0,
            "AffectNet 8-class expression labels, ids 0-7",
        ),
        _make("basic-7", BASIC, 0, "The seven basic classes in cervl's canonical order"),
    )
}


def get_label_set(name: str) -> LabelSet:
    """Return the named :class:`LabelSet` (tolerant of case, ``_`` and ``-``)."""
    return lookup(LABEL_SETS, name, "label set", normalize=lambda n: normalize_name(n).replace(" ", "-"))


def label_set_containing(names: set[str]) -> LabelSet:
    """The smallest registered label set that contains every canonical name in ``names``."""
    candidates = [s for s in LABEL_SETS.values() if names <= set(s.classes)]
    if not candidates:
        raise UnknownName(f"no label set contains all of {sorted(names)}; pass --label-set explicitly")
    return min(candidates, key=len)
