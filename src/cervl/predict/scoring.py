"""Exact constrained scoring: every class's full answer log-likelihood, with shared-prefix reuse.

``score`` mode gives every class the model's log-likelihood of its full answer (class-name tokens
plus the end-of-turn token) given the prompt and image, then normalises across classes, so every
prediction is a valid class. :func:`score_labels_bruteforce` is the slow reference the tests
compare :class:`LabelScorer` with.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from tqdm import tqdm

from cervl.core.images import load_rgb
from cervl.models.encode import (IGNORE, Encoded, answer_ids, collate, encode_prompt, pad_id, prompt_text, shared_prefix,
                          token_logprobs)
from cervl.core.labels import LabelSet
from cervl.models.loading import cache_kwargs, core_and_head, unwrap
from cervl.models.prompts import PromptStyle


# Attention implementations that accept an arbitrary boolean 4-D mask, which the answer trie needs.
TREE_MASK_ATTENTION = ("sdpa", "eager")


@contextlib.contextmanager
def tree_mask_attention(model):
    """Run ``model`` with an attention implementation that takes the trie's tree mask.

    flash-attention 2 (the training default on GPUs where it is installed) only knows causal and
    padding masks; scoring switches the model to SDPA for its forwards and back afterwards, so a
    mid-training evaluation leaves the training attention as it was.
    """
    base = unwrap(model)
    current = getattr(base.config, "_attn_implementation", "sdpa")
    if current in TREE_MASK_ATTENTION:
        yield
        return
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(current)


class LabelScorer:
    """Exact constrained scoring with shared-prefix and per-image KV-cache reuse.

    1. The prompt part before the image (system, guidelines, definitions: identical for every
       sample) is encoded once and its KV cache reused for every batch.
    2. Each batch encodes the image and the rest of the prompt once per image.
    3. All candidate answers are then evaluated from that cached state in one forward over the token
       trie of the answers (shared prefixes such as "Sadly" are computed once; a tree attention mask
       keeps candidates apart), so multi-token class names are scored exactly.

    Probabilities are normalised across classes; ``normalize`` picks ``sum`` (total log-likelihood
    of a class's answer tokens plus end-of-turn: the exact sequence probability, default) or ``mean``
    (per-token average).
    """

    def __init__(self, model, processor, style: PromptStyle, label_set: LabelSet, *, normalize: str = "sum"):
        if normalize not in ("sum", "mean"):
            raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
        self.model, self.processor, self.style, self.label_set = model, processor, style, label_set
        self.normalize = normalize
        tok = processor.tokenizer
        self.text = prompt_text(processor, style, label_set)
        self.cands = [answer_ids(tok, c) for c in label_set.classes]
        ids = tok(self.text, add_special_tokens=False)["input_ids"]
        self.prefix = shared_prefix(tok, self.text)
        # The prompt's tokens around its single image placeholder: per image only the number of image
        # tokens changes, so prompts are assembled from these instead of re-tokenising the text.
        self.image_token = model.config.image_token_id
        at = ids.index(self.image_token)
        self.before, self.after = ids[:at], ids[at + 1:]
        self.merge = processor.image_processor.merge_size ** 2
        self._prefix_cache = None
        # Trie of answer prefixes (all but each answer's last token), parents before children.
        self.trie: dict[tuple[int, ...], int] = {}
        for c in self.cands:
            for j in range(1, len(c)):
                self.trie.setdefault(tuple(c[:j]), len(self.trie))
        nodes = list(self.trie)
        self.trie_tokens = [p[-1] for p in nodes]
        self.trie_depth = torch.tensor([len(p) for p in nodes])
        self.trie_mask = torch.tensor([[len(q) <= len(p) and p[: len(q)] == q for q in nodes] for p in nodes],
                                      dtype=torch.bool)
        self.device = next(model.parameters()).device

    def _prefix_state(self):
        if self._prefix_cache is None:
            self._prefix_cache = self._encode_prefix()
        return copy.deepcopy(self._prefix_cache)

    @torch.no_grad()  # the prefix holds no image: a pixel gradient (cervl explain) never flows through it
    def _encode_prefix(self):
        from transformers import DynamicCache

        ids = torch.tensor([self.prefix], device=self.device)
        pos = torch.arange(len(self.prefix), device=self.device).view(1, 1, -1).expand(3, 1, -1)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids, position_ids=pos, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        return cache

    @torch.no_grad()
    def score_encoded(self, ids: torch.Tensor, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Log-scores (B, K) for a batch of equal-length prompts (same image grid)."""
        return self.log_scores(ids, pixels, grid)

    def log_scores(self, ids: torch.Tensor, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """:meth:`score_encoded` with autograd on (``pixels`` may require grad: the gradient saliency method)."""
        b, p = ids.shape[0], len(self.prefix)
        if p == 0 or ids[:, :p].tolist() != [self.prefix] * b:
            raise RuntimeError("prompt prefix mismatch; the processor changed the text before the image")
        image_token = self.model.config.image_token_id
        mm = (ids == image_token).long()
        mask = torch.ones_like(ids)
        pos, _ = core_and_head(self.model)[0].get_rope_index(input_ids=ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                  attention_mask=mask)
        cache = self._prefix_state()
        cache.batch_repeat_interleave(b)
        out = self.model(input_ids=ids[:, p:], pixel_values=pixels, image_grid_thw=grid, position_ids=pos[:, :, p:],
                         attention_mask=mask, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
        scores = torch.stack([first[:, c[0]] for c in self.cands], dim=1)  # (B, K)
        if self.trie:
            # All candidates continue from the cached prompt as one packed "tree": every trie node (a
            # distinct answer prefix) is one token that attends to the prompt and to its own ancestors.
            n, t = len(self.trie), ids.shape[1]
            feed = torch.tensor([self.trie_tokens], device=self.device).expand(b, n)
            nxt = pos.max(dim=0).values.max(dim=1).values + 1  # (B,) next text position after the prompt
            cpos = (nxt[:, None] + self.trie_depth[None].to(self.device) - 1)[None].expand(3, b, n)
            mask = torch.ones((b, 1, n, t + n), dtype=torch.bool, device=self.device)
            mask[:, :, :, t:] = self.trie_mask.to(self.device)
            logits = self.model(input_ids=feed, position_ids=cpos, attention_mask=mask, **cache_kwargs(cache),
                                use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, n, V)
            for i, c in enumerate(self.cands):
                for j in range(1, len(c)):
                    scores[:, i] += logp[:, self.trie[tuple(c[:j])], c[j]]
        if self.normalize == "mean":
            scores = scores / torch.tensor([len(c) for c in self.cands], device=self.device)
        return scores

    def __call__(self, images: list, *, batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """Class probabilities, shape (len(images), len(label_set))."""
        self.model.eval()
        with tree_mask_attention(self.model):
            return self._score_all(images, batch_size, progress)

    def _score_all(self, images: list, batch_size: int, progress: bool) -> np.ndarray:
        out = np.zeros((len(images), len(self.cands)))
        bar = tqdm(total=len(images), desc="scoring", unit="img", disable=not progress)
        for start in range(0, len(images), batch_size):
            chunk = [load_rgb(im) for im in images[start:start + batch_size]]
            # Group by image size: same-size images give same-length prompts, which need no padding.
            groups: dict[tuple[int, int], list[int]] = {}
            for i, im in enumerate(chunk):
                groups.setdefault(im.size, []).append(i)
            for members in groups.values():
                enc = self.processor.image_processor([chunk[i] for i in members], return_tensors="pt")
                grid = enc["image_grid_thw"]
                n_img = int(grid[0].prod()) // self.merge
                row = self.before + [self.image_token] * n_img + self.after
                ids = torch.tensor([row] * len(members), device=self.device)
                scores = self.score_encoded(ids, enc["pixel_values"].to(self.device), grid.to(self.device))
                out[[start + i for i in members]] = torch.softmax(scores, dim=-1).cpu().numpy()
            bar.update(len(chunk))
        bar.close()
        return out


def score_labels(model, processor, style: PromptStyle, label_set: LabelSet, images: list, *, batch_size: int = 8,
                 normalize: str = "sum", progress: bool = False) -> np.ndarray:
    """Class probabilities (N, K) by :class:`LabelScorer` (exact, cached)."""
    return LabelScorer(model, processor, style, label_set, normalize=normalize)(
        images, batch_size=batch_size, progress=progress)


def score_labels_bruteforce(model, processor, style: PromptStyle, label_set: LabelSet, images: list, *,
                            batch_size: int = 8, normalize: str = "sum", progress: bool = False) -> np.ndarray:
    """Reference implementation: every (image, class) pair as one full sequence, no cache (K x slower).

    Used by the tests to check :class:`LabelScorer` exactly.
    """
    text = prompt_text(processor, style, label_set)
    answers = [list(label_set.classes)] * len(images)
    return score_answer_texts(model, processor, text, images, answers, batch_size=batch_size, normalize=normalize,
                              progress=progress)


@torch.no_grad()
def score_answer_texts(model, processor, text: str, images: list, answers: list[list[str]], *, batch_size: int = 8,
                       normalize: str = "sum", progress: bool = False) -> np.ndarray:
    """Probabilities (N, K): image i's K candidate answers ``answers[i]`` (full texts, each followed by the
    end-of-turn token), scored as whole sequences after prompt ``text`` and normalised across candidates.

    The slow, general path: the au-caption mode's answers differ per image (its own caption, then each class).
    """
    model.eval()
    tok = processor.tokenizer
    k = len(answers[0]) if answers else 0
    pad = pad_id(tok)
    image_token_id = model.config.image_token_id
    device = next(model.parameters()).device
    out = np.zeros((len(images), k))
    bar = tqdm(total=len(images), desc="scoring", unit="img", disable=not progress)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        encoded, longest = [], 0
        for img, cand_texts in zip(chunk, answers[start:start + batch_size]):
            ids, pixels, grid = encode_prompt(processor, text, load_rgb(img))
            for cand in (answer_ids(tok, c) for c in cand_texts):
                encoded.append(Encoded(ids + cand, [IGNORE] * len(ids) + cand, pixels, grid))
                longest = max(longest, len(cand))
        batch = {key: v.to(device) for key, v in
                 collate(encoded, pad, image_token_id, padding_side="left").items()}
        # Answers sit at the end (left padding): only the last few positions need vocabulary logits,
        # which keeps memory flat with a 150k-token vocabulary.
        keep = longest + 1
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
