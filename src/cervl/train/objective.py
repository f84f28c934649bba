"""The training objective, computed exactly but without the work a standard trainer wastes.

The loss is the summed cross-entropy of the supervised tokens (answer + end-of-turn). Three levers,
each exact (the same loss and gradients, up to float summation order):

1. **Answer-only logits.** The LM head runs only on the hidden states that predict a supervised
   token, instead of on every position (B x T x 151k for Qwen-VL).
2. **Shared-prefix forward.** The prompt before the image (system, guidelines, definitions) is
   identical for every sample of a stage. It is run once per batch with batch size 1 and gradients
   on; its keys/values are repeated over the batch for the per-sample suffix (image + question +
   answer), so backward sums the prefix's gradients over the batch exactly. Multimodal RoPE
   positions of the suffix are taken from the full sequence's position computation.
3. **Vision-feature cache.** With a frozen vision tower and merger, each image's visual embeddings
   are computed once and reused across epochs and stages (:class:`VisionCache`).

:func:`decide_levers` is the one place that decides, once per stage, which levers are on and why;
the decision is recorded in the stage's ``DONE.json``. Nothing falls back silently: a batch that does
not start with the shared prefix (which a stage's fixed prompt rules out) is warned about and counted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cervl.models.encode import IGNORE
from cervl.models.loading import ACCEPTS_ENCODER_OUTPUTS, cache_kwargs, core_and_head

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 16  # below this many tokens the extra forward costs more than it saves


class VisionCache:
    """Per-image visual embeddings (merger outputs), reused while the vision tower stays frozen.

    Keys cover the image file's bytes (hash), the image-processor settings and a fingerprint of the
    vision weights, so a changed tower or processor never reads stale features. Entries stay in
    memory up to ``budget_mb``, then go to safetensors files under ``folder``.
    """

    def __init__(self, model, processor, folder: Path | None, budget_mb: int, *,
                 memory: dict[str, torch.Tensor] | None = None):
        core, _ = core_and_head(model)
        self.prefix = _fingerprint(core.visual, processor.image_processor)
        self.folder, self.budget = (Path(folder) if folder else None), budget_mb * 2**20
        self.memory = memory if memory is not None else {}  # one dict shared by a run's stages
        self.used = sum(t.numel() * t.element_size() for entry in self.memory.values() for t in entry.values())
        self.hits, self.misses = 0, 0

    def key(self, image_hash: str) -> str:
        return hashlib.sha1(f"{self.prefix}/{image_hash}".encode()).hexdigest()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """One image's entry: ``{"f": merger output, "d0", "d1"...: deepstack features (Qwen3-VL)}``."""
        if key in self.memory:
            return self.memory[key]
        if self.folder is not None and (self.folder / f"{key}.safetensors").is_file():
            from safetensors.torch import load_file

            return load_file(self.folder / f"{key}.safetensors")
        return None

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        entry = {k: v.detach() for k, v in entry.items()}
        size = sum(v.numel() * v.element_size() for v in entry.values())
        if self.used + size <= self.budget:
            self.memory[key] = entry
            self.used += size
        elif self.folder is not None:
            from safetensors.torch import save_file

            self.folder.mkdir(parents=True, exist_ok=True)
            # a name of this process's own: every rank of a multi-process run spills into the same folder
            tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                save_file({k: v.contiguous().cpu() for k, v in entry.items()}, tmp)
                os.replace(tmp, self.folder / f"{key}.safetensors")  # atomic: readers see a whole file or none
            finally:
                tmp.unlink(missing_ok=True)

    def features(self, core, pixel_values, grid, image_hashes: list[str | None]):
        """The vision output for a batch (what ``get_image_features`` returns): cached images reused,
        the others computed in one tower call. A hash of None (an augmented view that is drawn afresh, see
        :mod:`cervl.train.augment`) is computed and never stored: no other view can ever read its features."""
        keys = [self.key(h) if h is not None else None for h in image_hashes]
        found = [self.get(k) if k is not None else None for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            patches = grid.prod(-1).tolist()
            starts = [sum(patches[:i]) for i in range(len(patches))]
            pv = torch.cat([pixel_values[starts[i]: starts[i] + patches[i]] for i in missing])
            with torch.no_grad():
                out = core.get_image_features(pv, grid[missing], return_dict=True)
            deep = getattr(out, "deepstack_features", None) or []
            for j, i in enumerate(missing):
                found[i] = {"f": out.pooler_output[j], **{f"d{layer}": per_image[j] for layer, per_image in enumerate(deep)}}
                if keys[i] is not None:
                    self.put(keys[i], found[i])
        device = pixel_values.device
        pooled = tuple(f["f"].to(device) for f in found)
        layers = sorted((k for k in found[0] if k.startswith("d")), key=lambda k: int(k[1:]))
        if core.config.model_type == "qwen3_vl":
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

            deep = [tuple(f[k].to(device) for f in found) for k in layers]
            return BaseModelOutputWithDeepstackFeatures(pooler_output=pooled, deepstack_features=deep)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=pooled)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


def _fingerprint(visual, image_processor) -> str:
    """Hash of the vision weights and the processor settings that shape its input."""
    h = hashlib.sha1()
    for name, p in sorted(visual.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
    settings = {k: getattr(image_processor, k, None) for k in ("size", "patch_size", "merge_size", "image_mean",
                                                                "image_std", "temporal_patch_size")}
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


class AnswerObjective(torch.nn.Module):
    """``forward(batch) -> summed cross-entropy of the supervised tokens`` (see the module docstring).

    Wraps the (peft) model so that distributed wrappers (DDP/FSDP through accelerate) see one forward
    per micro-batch, whichever levers are on.
    """

    def __init__(self, model, *, prefix: list[int] | None = None, vision_cache: VisionCache | None = None,
                 full_logits: bool = False):
        super().__init__()
        self.model, self.full_logits = model, full_logits  # full_logits: the standard way, for benchmarks
        if vision_cache is not None and not ACCEPTS_ENCODER_OUTPUTS:
            raise ValueError("this transformers version takes no precomputed image features (mm_encoder_outputs): "
                             "a vision cache cannot be used (decide_levers turns it off)")
        self.prefix, self.vision_cache = list(prefix or []), vision_cache
        self.shared_batches = self.plain_batches = 0  # what actually ran, recorded in DONE.json

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, image_hashes=None):
        core, head = core_and_head(self.model)
        vision = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        if self.vision_cache is not None and image_hashes is not None and pixel_values is not None:
            out = self.vision_cache.features(core, pixel_values, image_grid_thw, image_hashes)
            vision = {"image_grid_thw": image_grid_thw, "mm_encoder_outputs": {"image": out}}
        p = len(self.prefix)
        if p and input_ids.shape[1] > p and bool((input_ids[:, :p] == input_ids.new_tensor(self.prefix)).all()):
            hidden, labels = self._shared_prefix(core, input_ids, attention_mask, labels, mm_token_type_ids, vision)
            self.shared_batches += 1
        else:
            if p and not self.plain_batches:
                log.warning("a batch does not start with the %d-token shared prefix: it runs the plain forward "
                            "(counted in DONE.json as plain_batches)", p)
            self.plain_batches += 1
            hidden = core(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                          **vision).last_hidden_state
        target = labels[:, 1:]
        if self.full_logits:  # what a standard trainer does: B x T x V logits, then mask
            logits = head(hidden[:, :-1]).float()
            return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        # Answer-only logits: the hidden state at t predicts token t+1; keep only supervised targets.
        keep = target != IGNORE
        logits = head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, target[keep], reduction="sum")

    def lever_record(self) -> dict:
        """What the levers did in this process's steps (not what was configured), for ``DONE.json``."""
        cache = self.vision_cache
        return {"shared_prefix_tokens": len(self.prefix) if self.shared_batches else 0,
                "shared_prefix_batches": self.shared_batches, "plain_batches": self.plain_batches,
                "vision_cache_hits": cache.hits if cache else None, "vision_cache_misses": cache.misses if cache else None,
                "vision_cache_hit_rate": round(cache.hit_rate, 4) if cache else None}

    def _shared_prefix(self, core, input_ids, attention_mask, labels, mm_token_type_ids, vision):
        from transformers import DynamicCache

        p, b = len(self.prefix), input_ids.shape[0]
        if bool((labels[:, : p + 1] != IGNORE).any()):
            raise ValueError("a supervised token lies inside the shared prefix")
        # M-RoPE positions of the whole sequence, then split: the suffix keeps its true positions.
        pos, _ = core.get_rope_index(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids,
                                     image_grid_thw=vision["image_grid_thw"], attention_mask=attention_mask)
        cache = DynamicCache(config=core.config)
        core(input_ids=input_ids[:1, :p], position_ids=pos[:, :1, :p], **cache_kwargs(cache), use_cache=True)
        cache.batch_repeat_interleave(b)  # differentiable: backward sums the batch's prefix gradients
        out = core(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=pos[:, :, p:],
                   **cache_kwargs(cache), use_cache=True, **{k: v for k, v in vision.items() if v is not None})
        # The suffix's first hidden state predicts labels[p + 1]; labels[p] (predicted by the prefix) is unsupervised.
        return out.last_hidden_state, labels[:, p:]


@dataclass
class Levers:
    """A stage's training levers, decided once by :func:`decide_levers`, with the reason for each."""

    prefix: list[int] | None
    vision_cache: VisionCache | None
    gradient_checkpointing: bool
    why: dict[str, str]

    def objective(self, model) -> AnswerObjective:
        """The loss module with these levers (gradient checkpointing is switched on here, on the model)."""
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return AnswerObjective(model, prefix=self.prefix, vision_cache=self.vision_cache)

    def record(self, objective: AnswerObjective) -> dict:
        """For ``DONE.json``: what was decided and why, and what the levers did."""
        return {"decided": dict(self.why), "gradient_checkpointing": self.gradient_checkpointing,
                **objective.lever_record()}


def decide_levers(model, processor, cfg, stage, prompt: str, *, sharded: bool, cache_dir: Path,
                  memory: dict) -> Levers:
    """Which levers a stage uses, and why (see the module docstring). Answer-only logits are always on.

    ``memory`` is the vision cache's in-memory store, shared by a run's stages; ``cache_dir`` its spill folder.
    """
    from cervl.models.encode import shared_prefix

    why: dict[str, str] = {}
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:  # auto: real models above 3B parameters
        checkpointing = sum(p.numel() for p in model.parameters()) > 3e9
    prefix = shared_prefix(processor.tokenizer, prompt)
    if not cfg.shared_prefix:
        why["shared_prefix"], prefix = "off: shared_prefix=false", None
    elif checkpointing:  # checkpointing would recompute the cached prefix keys/values
        why["shared_prefix"], prefix = "off: gradient checkpointing is on", None
    elif sharded:  # the prefix's keys/values reach the loss through the cache, not the core's output, so FSDP
        # would not re-gather the (resharded) weights for that part of the backward
        why["shared_prefix"], prefix = "off: sharded stage (FSDP)", None
    elif len(prefix) < MIN_SHARED_PREFIX:
        why["shared_prefix"] = f"off: the prompt's shared prefix has {len(prefix)} tokens (< {MIN_SHARED_PREFIX})"
        prefix = None
    else:
        why["shared_prefix"] = f"on: {len(prefix)} tokens"
    frozen_vision = stage.method == "lora" and stage.lora.vision == "frozen" and stage.lora.merger == "frozen"
    cache = None
    if not cfg.vision_cache_mb:
        why["vision_cache"] = "off: vision_cache_mb=0"
    elif not frozen_vision:
        why["vision_cache"] = "off: the stage trains the vision tower or merger"
    elif sharded:  # a hit on one rank and a miss on another would run the sharded tower on one rank only: hang
        why["vision_cache"] = "off: sharded stage (FSDP)"
    elif not ACCEPTS_ENCODER_OUTPUTS:
        why["vision_cache"] = "off: this transformers version takes no precomputed image features"
    else:
        cache = VisionCache(model, processor, cache_dir, cfg.vision_cache_mb, memory=memory)
        why["vision_cache"] = f"on: {cfg.vision_cache_mb} MB in memory, then {cache_dir.name}/"
    log.info("stage %s levers: %s", stage.name, "; ".join(f"{k} {v}" for k, v in why.items()))
    return Levers(prefix, cache, bool(checkpointing), why)
