"""Prompt styles: chat messages for one face image plus a label set, and the answer target.

``PROMPT_STYLES`` is the registry (name -> style); :func:`get_prompt_style` is its factory.
The answer target is the canonical class name; ``au-describe`` answers with the AU caption alone (pretraining)
and ``au-caption`` with the AU caption, then the class name.
Styles put every part shared by all samples *before* the image, so prompts share a common
token prefix whose KV cache can be reused at inference.
"""

from __future__ import annotations


from cervl.core.facs import AUS, PROTOTYPES, describe_aus
from cervl.core.labels import LabelSet, components, is_compound
from cervl.core.registry import lookup

IMAGE = {"type": "image"}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


class PromptStyle:
    """Base class; subclasses set ``name`` and implement :meth:`messages`."""

    name = ""
    answers_with = "label"  # "label" (class name), "aus" (AU caption) or "aus+label" (AU caption, then class name)

    def messages(self, label_set: LabelSet) -> list[dict]:
        raise NotImplementedError

    def answer(self, label: str | None, aus: dict[str, float] | None = None) -> str:
        if label is None:
            raise ValueError("an unlabelled record has no answer target")
        return label

    def corpus(self, label_set: LabelSet) -> list[str]:
        """Plain text of the prompt, for training the tiny tokenizer."""
        out = []
        for m in self.messages(label_set):
            content = m["content"]
            out += [content] if isinstance(content, str) else [c["text"] for c in content if c["type"] == "text"]
        return out + list(label_set.classes)


class MinimalPrompt(PromptStyle):
    name = "minimal"

    def messages(self, label_set: LabelSet) -> list[dict]:
        options = ", ".join(label_set.classes)
        return [{"role": "user", "content": [
            IMAGE, _text(f"Which expression does this face show? Answer with one of: {options}.")]}]


GUIDELINES = (
    "You are an expert in facial expression analysis using the Facial Action Coding System.\n"
    "Analysis guidelines: examine the brows (raised, lowered, drawn together), the eyes (widened, "
    "tightened, cheeks raised), the nose (wrinkled), and the mouth (corners pulled up or down, lips "
    "stretched, pressed, parted, jaw dropped). Then combine them: a compound expression shows the cues "
    "of two basic emotions at once, the first word naming the secondary emotion (e.g. Happily Surprised "
    "= happiness with surprise).\n"
    "Output format: answer with exactly one category name from the list, spelled as listed, and nothing else."
)


def definition(name: str) -> str:
    """A one-line, AU-grounded definition of a class (used by the ``context`` prompt)."""
    proto = PROTOTYPES.get(name)
    if proto is None:  # Contempt, Other: no AU prototype in the table
        return {"Contempt": "one lip corner raised and tightened (AU12+AU14 on one side).",
                "Other": "an expression that fits none of the other categories."}[name]
    if not proto.required:
        return "relaxed face, no action units active."
    cues = "; ".join(f"{AUS[a][1]} (AU{a})" for a in proto.required)
    if is_compound(name):
        a, b = components(name)
        return f"{a.lower()} combined with {b.lower()}: {cues}."
    return f"{cues}."


class ContextPrompt(PromptStyle):
    """The paper's context prompt: guidelines + category definitions + strict format, then the image."""

    name = "context"

    def messages(self, label_set: LabelSet) -> list[dict]:
        defs = "\n".join(f"- {c}: {definition(c)}" for c in label_set.classes)
        return [
            {"role": "system", "content": GUIDELINES},
            {"role": "user", "content": [
                _text(f"Categories:\n{defs}\n"), IMAGE,
                _text("Which category does this face show? Answer with the category name only.")]},
        ]


class AuDescribePrompt(PromptStyle):
    """Describe the active action units, nothing else: pretrains the tiny base (dense supervision, no label)."""

    name = "au-describe"
    answers_with = "aus"

    def messages(self, label_set: LabelSet) -> list[dict]:
        return [{"role": "user", "content": [IMAGE, _text("Describe the facial action units of this face.")]}]

    def answer(self, label: str | None, aus: dict[str, float] | None = None) -> str:
        if aus is None:
            raise ValueError("the au-describe prompt needs ground-truth AUs (record field 'aus')")
        return describe_aus({int(k.removeprefix("AU")): v for k, v in aus.items()})

    def corpus(self, label_set: LabelSet) -> list[str]:
        return super().corpus(label_set) + [d for _, d in AUS.values()]


EXPRESSION_MARK = ". Expression: "  # between the AU caption and the class name in an au-caption answer


class AuCaptionPrompt(AuDescribePrompt):
    """Name the active action units, then the label ("<AU caption>. Expression: <class>").

    The answer grounds the label in visible evidence; :mod:`cervl.predict.aucaption` scores it exactly
    (the greedy caption, then every class's full answer) and reads the AUs back from the caption.
    """

    name = "au-caption"
    answers_with = "aus+label"

    def messages(self, label_set: LabelSet) -> list[dict]:
        options = ", ".join(label_set.classes)
        return [{"role": "user", "content": [IMAGE, _text(
            "Describe the facial action units of this face, then name its expression, one of: " + options + ".")]}]

    def answer(self, label: str | None, aus: dict[str, float] | None = None) -> str:
        if label is None:
            raise ValueError("an unlabelled record has no answer target")
        return super().answer(label, aus) + EXPRESSION_MARK + label

    def corpus(self, label_set: LabelSet) -> list[str]:
        return super().corpus(label_set) + [EXPRESSION_MARK.strip(". ")]


def caption_aus(caption: str) -> list[int]:
    """The AUs an AU caption names (the inverse of :func:`cervl.core.facs.describe_aus`), in AU order."""
    text = caption.lower()
    return [au for au, (_, visible) in AUS.items() if visible.lower() in text]


PROMPT_STYLES: dict[str, PromptStyle] = {s.name: s for s in (MinimalPrompt(), ContextPrompt(), AuDescribePrompt(),
                                                               AuCaptionPrompt())}


def get_prompt_style(name: str) -> PromptStyle:
    """The registered :class:`PromptStyle` called ``name``."""
    return lookup(PROMPT_STYLES, name, "prompt style")
