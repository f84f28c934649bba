"""The ``au-caption`` mode: the model names the active action units, then the label; both are returned.

Scoring stays exact for the label: the caption is decoded greedily (the model's own description of the
face), then every class's full answer ("<caption>. Expression: <class>") is scored as one sequence and the
scores are normalised across classes. The caption's AUs are read back with
:func:`cervl.models.prompts.caption_aus`, so ``cervl eval`` can compare them with the true AUs (per-AU F1).
"""

from __future__ import annotations

import numpy as np

from cervl.models.encode import prompt_text
from cervl.core.facs import au_key
from cervl.core.labels import LabelSet
from cervl.predict.generate import generate_answers
from cervl.predict.scoring import score_answer_texts
from cervl.models.prompts import EXPRESSION_MARK, PromptStyle, caption_aus


def split_answer(text: str) -> str:
    """The AU caption part of an au-caption answer (everything before ". Expression:")."""
    head = text.split(EXPRESSION_MARK.strip(" "), 1)[0] if EXPRESSION_MARK.strip(" ") in text else text
    return head.strip().rstrip(".").strip()


class AuCaptionScorer:
    """Probabilities (N, K) for the au-caption style; :attr:`captions` holds the last call's captions."""

    def __init__(self, model, processor, style: PromptStyle, label_set: LabelSet, *, normalize: str = "sum",
                 max_new_tokens: int = 96):
        self.model, self.processor, self.style, self.label_set = model, processor, style, label_set
        self.normalize, self.max_new_tokens = normalize, max_new_tokens
        self.text = prompt_text(processor, style, label_set)
        self.captions: list[str] = []

    def __call__(self, images: list, *, batch_size: int = 8, progress: bool = False) -> np.ndarray:
        self.captions = []
        for start in range(0, len(images), batch_size):
            texts = generate_answers(self.model, self.processor, self.style, self.label_set,
                                     images[start:start + batch_size], max_new_tokens=self.max_new_tokens)
            self.captions += [split_answer(t) for t in texts]
        answers = [[f"{c}{EXPRESSION_MARK}{k}" for k in self.label_set.classes] for c in self.captions]
        return score_answer_texts(self.model, self.processor, self.text, images, answers, batch_size=batch_size,
                                  normalize=self.normalize, progress=progress)


def caption_fields(caption: str) -> dict:
    """The prediction row's ``caption`` and ``aus`` (AU keys such as ``AU04``) for one caption."""
    return {"caption": caption, "aus": [au_key(a) for a in caption_aus(caption)]}


__all__ = ["AuCaptionScorer", "caption_fields", "split_answer"]
