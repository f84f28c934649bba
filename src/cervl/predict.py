"""Prediction: constrained label scoring over the label set (exact multi-token log-likelihoods).

``score`` mode gives every class the model's log-likelihood of its full answer (class-name tokens
plus the end-of-turn token) given the prompt and image, then normalises across classes, so every
prediction is a valid class.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cervl.encode import IGNORE, Encoded, answer_ids, collate, encode_prompt, prompt_text, token_logprobs
from cervl.labels import COMPOUND, LabelSet, get_label_set
from cervl.prompts import PromptStyle

log = logging.getLogger(__name__)


def load_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _core(model):
    """The transformers Qwen-VL model under any peft wrapper (it owns ``get_rope_index``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


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
        vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
        ids = tok(self.text, add_special_tokens=False)["input_ids"]
        self.prefix = ids[: ids.index(vision_start)]
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
        from transformers import DynamicCache

        if self._prefix_cache is None:
            ids = torch.tensor([self.prefix], device=self.device)
            pos = torch.arange(len(self.prefix), device=self.device).view(1, 1, -1).expand(3, 1, -1)
            cache = DynamicCache(config=self.model.config)
            self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
            self._prefix_cache = cache
        return copy.deepcopy(self._prefix_cache)

    @torch.no_grad()
    def score_encoded(self, ids: torch.Tensor, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Log-scores (B, K) for a batch of equal-length prompts (same image grid)."""
        b, p = ids.shape[0], len(self.prefix)
        if p == 0 or ids[:, :p].tolist() != [self.prefix] * b:
            raise RuntimeError("prompt prefix mismatch; the processor changed the text before the image")
        image_token = self.model.config.image_token_id
        mm = (ids == image_token).long()
        mask = torch.ones_like(ids)
        pos, _ = _core(self.model).get_rope_index(input_ids=ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                  attention_mask=mask)
        cache = self._prefix_state()
        cache.batch_repeat_interleave(b)
        out = self.model(input_ids=ids[:, p:], pixel_values=pixels, image_grid_thw=grid, position_ids=pos[:, :, p:],
                         attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
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
            logits = self.model(input_ids=feed, position_ids=cpos, attention_mask=mask, cache=cache,
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
        out = np.zeros((len(images), len(self.cands)))
        bar = tqdm(total=len(images), desc="scoring", unit="img", disable=not progress)
        for start in range(0, len(images), batch_size):
            chunk = [load_rgb(im) if not isinstance(im, Image.Image) else im for im in images[start:start + batch_size]]
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


@torch.no_grad()
def score_labels_bruteforce(model, processor, style: PromptStyle, label_set: LabelSet, images: list, *,
                            batch_size: int = 8, normalize: str = "sum", progress: bool = False) -> np.ndarray:
    """Reference implementation: every (image, class) pair as one full sequence, no cache (K x slower).

    Used by the tests to check :class:`LabelScorer` exactly.
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


# ----------------------------------------------------------------------------------------------
# Free-text answers (generate mode)
# ----------------------------------------------------------------------------------------------

_JSON_KEYS = ("expression", "label", "emotion", "category", "class", "answer", "prediction")
_MARKUP = re.compile(r"[*_`#>\[\]\"'“”‘’]")


def _class_patterns(label_set_name: str) -> list[tuple[str, re.Pattern]]:
    """(canonical class, whole-word regex) for every class of a label set and its aliases."""
    if label_set_name not in _PATTERN_CACHE:
        from cervl.labels import _ALIASES, get_label_set, normalize_name

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


# ----------------------------------------------------------------------------------------------
# Generation and the Predictor
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_answers(model, processor, style: PromptStyle, label_set: LabelSet, images: list, *,
                     max_new_tokens: int = 24) -> list[str]:
    """Greedy decoding for a batch of images (left padding, so batched == unbatched)."""
    model.eval()
    text = prompt_text(processor, style, label_set)
    imgs = [load_rgb(im) if not isinstance(im, Image.Image) else im for im in images]
    tok = processor.tokenizer
    tok.padding_side = "left"
    batch = processor(text=[text] * len(imgs), images=imgs, return_tensors="pt", padding=True)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    new = out[:, batch["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)


class Predictor:
    """A trained model plus the prompt style and label set it was trained with.

    ``Predictor.from_run(run_dir)`` restores everything from the run directory; ``Predictor(model,
    processor, style, label_set)`` wraps an already loaded model (e.g. a base model plus an adapter).
    """

    def __init__(self, model, processor, style: PromptStyle | str, label_set: LabelSet | str):
        from cervl.prompts import get_prompt_style

        self.model, self.processor = model, processor
        self.style = get_prompt_style(style) if isinstance(style, str) else style
        self.label_set = get_label_set(label_set) if isinstance(label_set, str) else label_set
        self._scorer = None

    @classmethod
    def from_run(cls, run_dir, *, dtype: str = "fp32", device: str | None = None) -> "Predictor":
        from cervl.train import load_run

        model, processor, meta = load_run(run_dir, dtype=dtype)
        if device:
            model.to(device)
        return cls(model, processor, meta["prompt"], meta["label_set"])

    @classmethod
    def from_adapter(cls, base: str, adapter: str, *, prompt: str, label_set: str, dtype: str = "bf16"):
        """A base model (hub id or folder) plus a peft adapter folder, merged for inference."""
        from peft import PeftModel

        from cervl.models import load_model, merge_lora

        model, processor = load_model(base, dtype=dtype)
        return cls(merge_lora(PeftModel.from_pretrained(model, adapter)), processor, prompt, label_set)

    def score(self, images: list, *, batch_size: int = 8, normalize: str = "sum") -> np.ndarray:
        if self._scorer is None or self._scorer.normalize != normalize:
            self._scorer = LabelScorer(self.model, self.processor, self.style, self.label_set, normalize=normalize)
        return self._scorer(images, batch_size=batch_size)

    def generate(self, images: list, *, max_new_tokens: int = 24) -> list[tuple[str, str | None]]:
        texts = generate_answers(self.model, self.processor, self.style, self.label_set, images,
                                 max_new_tokens=max_new_tokens)
        return [(t, parse_answer(t, self.label_set.name)) for t in texts]

    def predict(self, items: list[dict], *, mode: str = "score", batch_size: int = 8, normalize: str = "sum",
                progress: bool = True):
        """Yield one prediction row per item (``{"id", "image", "label"?}``); bad images become error rows."""
        if mode not in ("score", "generate"):
            raise ValueError(f"mode must be 'score' or 'generate', got {mode!r}")
        bar = tqdm(total=len(items), desc=f"predict ({mode})", unit="img", disable=not progress)
        for start in range(0, len(items), batch_size):
            batch_items = items[start:start + batch_size]
            rows: list[dict | None] = [None] * len(batch_items)
            ok, images = [], []
            for i, item in enumerate(batch_items):
                try:
                    images.append(item["pil"] if "pil" in item else load_rgb(item["image"]))
                    ok.append(i)
                except Exception as e:  # corrupt/missing file: report it, keep going
                    log.error("cannot read image %s: %s", item["image"], e)
                    rows[i] = {**_row(item), "pred": None, "error": f"{type(e).__name__}: {e}"}
            if ok:
                t0 = time.perf_counter()
                if mode == "score":
                    probs = self.score(images, batch_size=len(images), normalize=normalize)
                    latency = (time.perf_counter() - t0) / len(ok) * 1000
                    for i, p in zip(ok, probs):
                        rows[i] = {**_row(batch_items[i]), "pred": self.label_set.classes[int(p.argmax())],
                                   "probs": {c: round(float(v), 6) for c, v in zip(self.label_set.classes, p)},
                                   "latency_ms": round(latency, 2)}
                else:
                    answers = self.generate(images)
                    latency = (time.perf_counter() - t0) / len(ok) * 1000
                    for i, (raw, parsed) in zip(ok, answers):
                        rows[i] = {**_row(batch_items[i]), "pred": parsed, "raw": raw, "latency_ms": round(latency, 2)}
            yield from rows  # input order, errors included
            bar.update(len(batch_items))
        bar.close()


def _row(item: dict) -> dict:
    row = {"id": item["id"], "image": str(item["image"]), "label": item.get("label")}
    for key in ("video", "frame"):
        if item.get(key) is not None:
            row[key] = item[key]
    return row


# ----------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------

class _VideoScorer:
    """Scores one video's :class:`~cervl.faces.video.FrameFace` stream in batches as frames arrive
    (memory does not grow with the video's length), then smooths the per-frame probabilities."""

    def __init__(self, predictor: "Predictor", video: str, batch_size: int = 16):
        self.predictor, self.video, self.batch_size = predictor, video, batch_size
        self.frames, self.raw, self.pending = [], [], []

    def add(self, f) -> None:
        import dataclasses

        self.raw.append(np.full(len(self.predictor.label_set), np.nan))
        if f.crop is not None:
            self.pending.append((len(self.frames), f.crop))
            if len(self.pending) >= self.batch_size:
                self._flush()
        self.frames.append(dataclasses.replace(f, crop=None))  # keep only the metadata of scored frames

    def _flush(self) -> None:
        probs = self.predictor.score([crop for _, crop in self.pending], batch_size=self.batch_size)
        for (i, _), p in zip(self.pending, probs):
            self.raw[i] = p
        self.pending.clear()

    def rows(self, smoothing: str = "gaussian", window: int = 5, sigma: float = 1.5) -> list[dict]:
        from cervl.faces.video import smooth

        if self.pending:
            self._flush()
        if not self.frames:
            raise ValueError(f"{self.video}: no frames decoded")
        classes, video = self.predictor.label_set.classes, self.video
        raw = np.stack(self.raw)
        have = [i for i in range(len(self.frames)) if not np.isnan(raw[i, 0])]
        # Fill frames without a face from the nearest frame with one, then smooth over time.
        filled = raw.copy()
        if have:
            idx = np.array(have)
            for i in range(len(self.frames)):
                if np.isnan(filled[i, 0]):
                    filled[i] = raw[idx[np.argmin(np.abs(idx - i))]]
            smoothed = smooth(filled, smoothing, window=window, sigma=sigma)
        rows = []
        for i, f in enumerate(self.frames):
            row = {"video": video, "frame": f.frame, "id": f"{video}/{f.frame:05d}", "status": f.status,
                   "box": f.box,
                   "probs": None if np.isnan(raw[i, 0]) else {c: round(float(v), 6) for c, v in zip(classes, raw[i])}}
            if have:
                row["probs_smoothed"] = {c: round(float(v), 6) for c, v in zip(classes, smoothed[i])}
                row["pred"] = classes[int(smoothed[i].argmax())]
            else:
                row["pred"] = None
            rows.append(row)
        return rows


def video_name(path) -> str:
    """A video's id in outputs: the file's stem, or a frame folder's name."""
    return Path(path).stem if Path(path).is_file() else Path(path).name


def predict_video(predictor: "Predictor", path, detector, *, every: int = 1, smoothing: str = "gaussian",
                  window: int = 5, sigma: float = 1.5, batch_size: int = 16, size: int = 112,
                  redetect_every: int = 120, verify_every: int = 10) -> list[dict]:
    """Per-frame predictions for one video (file or frame folder): detect, track, align, score, smooth.

    Crops are scored in batches as they come, so memory does not grow with the video's length.
    ``redetect_every`` and ``verify_every`` set the tracking (see :func:`cervl.faces.video.track_faces`).
    Frames without a face keep ``status: lost`` and no probabilities of their own; the smoothed
    output carries the neighbours' probabilities over them (so every sampled frame gets a label),
    and ``pred`` of a lost frame is None when no face was seen anywhere in the video.
    """
    from cervl.faces.video import video_faces

    scorer = _VideoScorer(predictor, video_name(path), batch_size)
    stream = video_faces(path, detector, every=every, size=size, redetect_every=redetect_every,
                         verify_every=verify_every)
    for f in tqdm(stream, desc=scorer.video, unit="frame", leave=False):
        scorer.add(f)
    return scorer.rows(smoothing, window, sigma)


def predict_videos(predictor: "Predictor", paths: list, *, detector: str = "mtcnn",
                   detector_options: dict | None = None, workers: int = 1, every: int = 1,
                   smoothing: str = "gaussian", window: int = 5, sigma: float = 1.5, batch_size: int = 16,
                   size: int = 112, redetect_every: int = 120, verify_every: int = 10
                   ) -> Iterator[tuple[int, list[dict] | str]]:
    """:func:`predict_video` over many videos; yields ``(index in paths, rows)`` as each video ends,
    or ``(index, error text)`` for a video that cannot be decoded (the others go on).

    With ``workers > 1``, decoding, face tracking and alignment run in that many processes (one core
    and one video each, see :func:`cervl.faces.video.many_video_faces`) while this process scores
    the crops as they arrive, so the model is never waiting on one video's preprocessing.
    """
    from cervl.faces.video import many_video_faces

    scorers: dict[int, _VideoScorer] = {}
    bar = tqdm(total=len(paths), unit="video", desc=f"videos ({workers} worker{'s' if workers > 1 else ''})")
    frames = 0
    events = many_video_faces(paths, detector=detector, detector_options=detector_options, workers=workers,
                              every=every, size=size, redetect_every=redetect_every, verify_every=verify_every)
    try:
        for kind, i, payload in events:
            if kind == "frames":
                scorer = scorers.setdefault(i, _VideoScorer(predictor, video_name(paths[i]), batch_size))
                for f in payload:
                    scorer.add(f)
                frames += len(payload)
                bar.set_postfix(frames=frames)
                continue
            bar.update(1)
            scorer = scorers.pop(i, None)
            if kind == "error":
                yield i, payload
            elif scorer is None:
                yield i, f"{paths[i]}: no frames decoded"
            else:
                yield i, scorer.rows(smoothing, window, sigma)
    finally:
        bar.close()


def plot_video_probs(rows: list[dict], classes: tuple[str, ...], path) -> Path:
    """Smoothed class probabilities over time (one line per class), frames without a face shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [r["frame"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    if rows and "probs_smoothed" in rows[0]:
        for c in classes:
            ax.plot(frames, [r["probs_smoothed"][c] for r in rows], label=c, lw=1.4)
    for r in rows:
        if r["status"] == "lost":
            ax.axvspan(r["frame"] - 0.5, r["frame"] + 0.5, color="0.85", lw=0)
    ax.set_xlabel("frame")
    ax.set_ylabel("probability (smoothed)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{rows[0]['video'] if rows else ''}: expression over time (grey: no face)", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
