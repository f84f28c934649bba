"""The full Qwen2-VL-2B shape on CPU (random weights, bf16, real tokenizer, context prompt).

    .venv/bin/python benchmarks/real_shape.py [--sizes 112x112,448x336] [--batch 4]

Reports, per image size: seconds per LoRA r16 training step at batch 4 (cervl's objective), peak RSS,
score and generate images/s, and the physical floor of scoring: one bare forward over each image's
non-shared tokens (image + question, the prompt prefix already cached), with score mode's cost as a
multiple of that floor. Needs ../shared (or $CERVL_SHARED) for the shapes and the tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CERVL_SHARED", ROOT.parent / "shared"))


def build():
    from transformers import AutoConfig, AutoTokenizer

    from cervl.models.loading import _transformers_attr, get_family, make_image_processor, make_processor

    cfg = AutoConfig.from_pretrained(SHARED / "qwen-vl-shapes" / "qwen2-vl-2b")
    family = get_family(cfg.model_type)
    torch.manual_seed(0)
    model = _transformers_attr(family.model_class)._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(SHARED / "qwen2-vl-tokenizer")
    return model, make_processor(family, make_image_processor(family, 56 * 56, 28 * 28 * 1280), tok)


def images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def timed(fn, repeats=2):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def train_step_seconds(base, proc, text, ims, ls) -> float:
    """One LoRA r16 step with cervl's objective (shared prefix, answer-only logits), on a copy of ``base``."""
    from cervl.models.encode import collate, encode_sample
    from cervl.models.loading import apply_lora, lora_target_regex
    from cervl.train.objective import AnswerObjective

    model = apply_lora(copy.deepcopy(base), rank=16, alpha=32, dropout=0.0, target_regex=lora_target_regex())
    tok = proc.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    objective = AnswerObjective(model, prefix=ids[: ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))])
    enc = [encode_sample(proc, text, im, ls.classes[i], max_length=16384) for i, im in enumerate(ims)]
    batch = collate(enc, tok.pad_token_id or 0, model.config.image_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        objective(**batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="112x112,448x336")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    if not (SHARED / "qwen-vl-shapes" / "qwen2-vl-2b" / "config.json").is_file():
        sys.exit(f"needs {SHARED}/qwen-vl-shapes and qwen2-vl-tokenizer (set CERVL_SHARED)")
    from transformers import DynamicCache

    from cervl.models.encode import prompt_text
    from cervl.core.labels import get_label_set
    from cervl.models.loading import cache_kwargs
    from cervl.predict import Predictor
    from cervl.predict.scoring import LabelScorer

    torch.set_num_threads(os.cpu_count() or 1)
    base, proc = build()
    ls = get_label_set("rafdb-compound")
    text = prompt_text(proc, Predictor(base, proc, "context", ls).style, ls)
    print(f"Qwen2-VL-2B shape, {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters, bf16, "
          f"{torch.get_num_threads()} threads", flush=True)
    print("| images | train step (batch 4, LoRA r16) | score img/s | generate img/s | bare forward floor | score / floor |")
    print("|---|---|---|---|---|---|")
    for size_text in args.sizes.split(","):
        size = tuple(int(v) for v in size_text.split("x"))
        ims = images(args.batch, size)
        step_s = train_step_seconds(base, proc, text, ims, ls)
        # scoring, generation and the floor, on the base model
        pred = Predictor(base, proc, "context", ls)
        scorer = LabelScorer(base, proc, pred.style, ls)
        score_s = timed(lambda: scorer(ims, batch_size=args.batch))
        gen_s = timed(lambda: pred.generate(ims, max_new_tokens=8), 1)
        enc_img = proc.image_processor(ims, return_tensors="pt")
        n_img = int(enc_img["image_grid_thw"][0].prod()) // 4
        row = scorer.before + [scorer.image_token] * n_img + scorer.after
        ids_t = torch.tensor([row] * args.batch)
        p = len(scorer.prefix)
        core = base.model
        pos, _ = core.get_rope_index(input_ids=ids_t, mm_token_type_ids=(ids_t == scorer.image_token).long(),
                                     image_grid_thw=enc_img["image_grid_thw"], attention_mask=torch.ones_like(ids_t))
        prefix_cache = scorer._prefix_state()

        @torch.no_grad()
        def floor():
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(args.batch)
            base(input_ids=ids_t[:, p:], pixel_values=enc_img["pixel_values"], image_grid_thw=enc_img["image_grid_thw"],
                 position_ids=pos[:, :, p:], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)

        floor_s = timed(floor)
        assert isinstance(prefix_cache, DynamicCache)
        print(f"| {size_text} ({n_img} visual tokens, {len(row) - p} non-shared tokens) | {step_s:.1f} s | "
              f"{args.batch / score_s:.2f} | {args.batch / gen_s:.2f} | {floor_s / args.batch:.2f} s/img | "
              f"{score_s / floor_s:.2f}x |", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


if __name__ == "__main__":
    main()
