"""Compound probabilities from a basic-emotion model, with no compound training data (the pair-wise baseline).

A compound class blends two basic emotions (:func:`cervl.core.labels.components`). Teams of ABAW-6 and ABAW-9 scored
it as the product of the two basic probabilities: ``P(A and B) ∝ p_A · p_B``, renormalised over the compound
label set. :class:`PairwisePredictor` wraps a basic-label :class:`~cervl.predict.Predictor` so that every
command that predicts (``cervl predict --compound-from-basic``, then ``cervl eval``) treats it as a compound
model.
"""

from __future__ import annotations

import numpy as np

from cervl.core.errors import InvalidInput
from cervl.core.labels import LabelSet, components, get_label_set
from cervl.predict.predictor import Predictor


def pair_indices(basic: LabelSet, compound: LabelSet) -> list[tuple[int, int]]:
    """For each compound class, the positions of its two components in ``basic``."""
    pairs = []
    for name in compound.classes:
        try:
            a, b = components(name)
        except ValueError:
            raise InvalidInput(f"{compound.name!r} holds {name!r}, which is not a compound class") from None
        missing = [c for c in (a, b) if c not in basic]
        if missing:
            raise InvalidInput(f"the model's label set {basic.name!r} has no {missing[0]!r}, a component of "
                               f"{name!r}: it cannot score {compound.name!r} pair-wise")
        pairs.append((basic.index_of[a], basic.index_of[b]))
    return pairs


def compound_from_basic(probs: np.ndarray, basic: LabelSet, compound: LabelSet) -> np.ndarray:
    """``(N, len(basic))`` basic probabilities -> ``(N, len(compound))``: ``p_A · p_B`` per compound class,
    each row renormalised to sum to 1."""
    probs = np.asarray(probs, dtype=np.float64)
    idx = np.array(pair_indices(basic, compound))
    joint = probs[:, idx[:, 0]] * probs[:, idx[:, 1]]
    return joint / joint.sum(1, keepdims=True)


class PairwisePredictor(Predictor):
    """A basic-emotion model answering in a compound label set through :func:`compound_from_basic`."""

    def __init__(self, basic: Predictor, compound: LabelSet | str = "rafdb-compound"):
        compound = get_label_set(compound) if isinstance(compound, str) else compound
        pair_indices(basic.label_set, compound)  # refuse a basic set that lacks a component, before any scoring
        super().__init__(basic.model, basic.processor, basic.style, compound)
        self.basic = basic

    def score(self, images: list, *, batch_size: int = 8, normalize: str = "sum") -> np.ndarray:
        return compound_from_basic(self.basic.score(images, batch_size=batch_size, normalize=normalize),
                                   self.basic.label_set, self.label_set)

    def generate(self, images: list, *, max_new_tokens: int = 24):
        raise InvalidInput("--compound-from-basic scores the basic classes and combines them: use --mode score")


__all__ = ["PairwisePredictor", "compound_from_basic", "pair_indices"]
