"""Prediction: constrained label scoring over the label set (exact multi-token log-likelihoods).

``score`` mode gives every class the model's log-likelihood of its full answer (class-name tokens
plus the end-of-turn token) given the prompt and image, then normalises across classes, so every
prediction is a valid class.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cervl.encode import IGNORE, answer_ids, collate, encode_prompt, prompt_text, token_logprobs
from cervl.labels import LabelSet
from cervl.prompts import PromptStyle

log = logging.getLogger(__name__)


def load_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@torch.no_grad()
def score_labels(model, processor, style: PromptStyle, label_set: LabelSet, images: list, *, batch_size: int = 8,
                 normalize: str = "sum", progress: bool = False) -> np.ndarray:
    """Class probabilities, shape (len(images), len(label_set)).

    ``normalize``: ``sum`` (total log-likelihood of the answer tokens, the default: exact sequence
    probability) or ``mean`` (per-token average, which removes the bias against long names).
    Each image is scored against all candidates as full continuations, in batches.
    """
    model.eval()
    tok = processor.tokenizer
    text = prompt_text(processor, style, label_set)
    cands = [answer_ids(tok, c) for c in label_set.classes]
    k = len(cands)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    image_token_id = model.config.image_token_id
    device = next(model.parameters()).device
    out = np.zeros((len(images), k))
    bar = tqdm(total=len(images), desc="scoring", unit="img", disable=not progress)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        encoded = []
        from cervl.encode import Encoded

        for img in chunk:
            img = load_rgb(img) if not isinstance(img, Image.Image) else img
            ids, pixels, grid = encode_prompt(processor, text, img)
            for cand in cands:
                encoded.append(Encoded(ids + cand, [IGNORE] * len(ids) + cand, pixels, grid))
        batch = {key: v.to(device) for key, v in
                 collate(encoded, pad_id, image_token_id, padding_side="left").items()}
        # Answers sit at the end (left padding): only the last few positions need vocabulary logits,
        # which keeps memory flat with a 150k-token vocabulary.
        keep = max(len(c) for c in cands) + 1
        labels = batch.pop("labels")[:, -keep:]
        logits = model(**batch, logits_to_keep=keep).logits
        lp = token_logprobs(logits, labels)
        total = lp.sum(-1)
        if normalize == "mean":
            total = total / (labels[:, 1:] != IGNORE).sum(-1)
        scores = total.view(len(chunk), k).float()
        out[start:start + len(chunk)] = torch.softmax(scores, dim=-1).cpu().numpy()
        bar.update(len(chunk))
    bar.close()
    return out
