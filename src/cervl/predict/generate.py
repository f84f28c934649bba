"""Free-text answers: greedy generation and the tolerant answer parser."""

from __future__ import annotations

import json
import logging
import re

import torch

from cervl.core.images import load_rgb
from cervl.models.encode import prompt_text
from cervl.core.labels import _ALIASES, COMPOUND, LabelSet, get_label_set, normalize_name
from cervl.models.prompts import PromptStyle

log = logging.getLogger(__name__)

_JSON_KEYS = ("expression", "label", "emotion", "category", "class", "answer", "prediction")
_MARKUP = re.compile(r"[*_`#>\[\]\"'“”‘’]")


def _class_patterns(label_set_name: str) -> list[tuple[str, re.Pattern]]:
    """(canonical class, whole-word regex) for every class of a label set and its aliases."""
    if label_set_name not in _PATTERN_CACHE:
        ls = get_label_set(label_set_name)
        pats = []
        # Classes outside the set are matched too, so "Happily Surprised" is not read as "Surprise"
        # by a basic label set: it names a class the set does not have (-> invalid).
        for c in ls.classes + tuple(c for c in COMPOUND if c not in ls):
            forms = {normalize_name(c)} | {a for a, target in _ALIASES.items() if target == c}
            for f in sorted(forms, key=len, reverse=True):
                pats.append((c, re.compile(r"(?<![a-z])" + re.escape(f).replace(r"\ ", r"\s+") + r"(?![a-z])")))
        _PATTERN_CACHE[label_set_name] = pats
    return _PATTERN_CACHE[label_set_name]


_PATTERN_CACHE: dict[str, list] = {}


def parse_answer(text: str, label_set: str) -> str | None:
    """Map a model's free-text answer to one canonical class of ``label_set``, or None (invalid).

    Accepts the exact name, case/hyphen/underscore variants, "The expression is X.", Markdown
    emphasis, JSON such as ``{"expression": "..."}`` and answers naming one class among other words.
    Returns None when no class or more than one class is named; never raises.
    """
    try:
        if not isinstance(text, str) or not text.strip():
            return None
        for match in re.finditer(r"\{[^{}]*\}", text):  # JSON objects first: their value is the answer
            try:
                obj = json.loads(match.group(0))
            except ValueError:
                continue
            if isinstance(obj, dict):
                for key, value in obj.items():
                    if str(key).lower() in _JSON_KEYS and isinstance(value, str):
                        found = parse_answer(value, label_set)
                        if found is not None:
                            return found
        norm = re.sub(r"[-_]+", " ", _MARKUP.sub(" ", text.lower()))
        spans: list[tuple[int, int, str]] = []
        for cls, pat in _class_patterns(label_set):
            spans += [(m.start(), m.end(), cls) for m in pat.finditer(norm)]
        # Drop matches nested inside a longer match ("surprised" inside "happily surprised").
        kept = {cls for s, e, cls in spans
                if not any((s2 <= s and e <= e2) and (e2 - s2) > (e - s) for s2, e2, _ in spans)}
        if len(kept) != 1:
            return None
        found = kept.pop()
        return found if found in get_label_set(label_set) else None
    except Exception:  # a parser that raises would lose a whole batch of predictions
        log.debug("parse_answer failed on %r", text, exc_info=True)
        return None



@torch.no_grad()
def generate_answers(model, processor, style: PromptStyle, label_set: LabelSet, images: list, *,
                     max_new_tokens: int = 24) -> list[str]:
    """Greedy decoding for a batch of images (left padding, so batched == unbatched)."""
    model.eval()
    text = prompt_text(processor, style, label_set)
    imgs = [load_rgb(im) for im in images]
    tok = processor.tokenizer
    tok.padding_side = "left"
    batch = processor(text=[text] * len(imgs), images=imgs, return_tensors="pt", padding=True)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    new = out[:, batch["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)
