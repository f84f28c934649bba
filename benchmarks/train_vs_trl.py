"""Training speed: cervl's levers one at a time and together, against TRL's SFTTrainer, side by side.

    .venv/bin/python benchmarks/train_vs_trl.py [--steps 6] [--repeats 3] [--sizes 112x112,448x336] [--no-trl]

Model: Qwen2-VL at the mid-size shape (hidden 512, 8 layers, vision patch 14), random weights, the real
Qwen2-VL tokenizer from ../shared (or $CERVL_SHARED), the context prompt, LoRA r16 on the language model's
projections, AdamW lr 1e-4 constant, batch 8, fp32 on CPU. Every variant runs in its own process
(peak RSS is that process's), interleaved over ``--repeats`` rounds; the table gives the median samples/s.
Variants: ``baseline`` (full B x T x V logits, as a standard trainer), each lever alone (``answer-only``,
``prefix`` = shared prefix with full logits, ``vision-cache``), ``all`` levers, and ``trl`` (TRL 1.16
``SFTTrainer``, completion-only loss; ``pip install trl``). The number of supervised tokens per sample is
asserted equal between cervl and TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CERVL_SHARED", ROOT.parent / "shared"))
VARIANTS = {"baseline": dict(full_logits=True, prefix=False, cache=False),
            "answer-only": dict(full_logits=False, prefix=False, cache=False),
            "prefix": dict(full_logits=True, prefix=True, cache=False),
            "vision-cache": dict(full_logits=True, prefix=False, cache=True),
            "all": dict(full_logits=False, prefix=True, cache=True)}
ANSWERS = ["Happily Surprised", "Sadly Angry", "Fearfully Surprised", "Sadly Fearful", "Angrily Disgusted",
           "Happily Disgusted", "Sadly Surprised", "Disgustedly Surprised"]


def build(size: tuple[int, int]):
    import torch

    from cervl.models.loading import build_tiny, get_family, make_image_processor, make_processor

    torch.manual_seed(0)
    model, proc = build_tiny("tiny-qwen2-vl", tokenizer_path=SHARED / "qwen2-vl-tokenizer", hidden=512, layers=8,
                             heads=8, kv_heads=4, intermediate=1536, patch_size=14, vision_dim=256)
    family = get_family("qwen2_vl")
    proc = make_processor(family, make_image_processor(family, 56 * 56, 28 * 28 * 1280, patch_size=14), proc.tokenizer)
    return model, proc


def images(n: int, size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def run_cervl(variant: str, size, steps: int, batch: int) -> dict:
    import torch

    from cervl.models.encode import collate, encode_sample, prompt_text
    from cervl.core.labels import get_label_set
    from cervl.models.loading import apply_lora, lora_target_regex
    from cervl.train.objective import AnswerObjective, VisionCache
    from cervl.models.prompts import get_prompt_style

    opts = VARIANTS[variant]
    model, proc = build(size)
    model = apply_lora(model, rank=16, alpha=32, dropout=0.0, target_regex=lora_target_regex())
    text = prompt_text(proc, get_prompt_style("context"), get_label_set("rafdb-compound"))
    tok = proc.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = ids[: ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))]
    pool = images(4 * batch, size)
    cache = VisionCache(model, proc, None, 4096) if opts["cache"] else None
    objective = AnswerObjective(model, prefix=prefix if opts["prefix"] else None, vision_cache=cache,
                                full_logits=opts["full_logits"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses, t0, supervised = [], None, None
    for step in range(steps + 1):  # step 0 warms up and is not timed
        idx = [(step * batch + i) % len(pool) for i in range(batch)]
        enc = [encode_sample(proc, text, pool[i], ANSWERS[i % len(ANSWERS)], max_length=16384) for i in idx]
        b = collate(enc, tok.pad_token_id or 0, model.config.image_token_id)
        supervised = supervised or [int((row != -100).sum()) for row in b["labels"][:, 1:]]
        if cache is not None:
            b["image_hashes"] = [f"img{i}" for i in idx]
        if step == 1:
            t0 = time.perf_counter()
        loss = objective(**b)
        n = (b["labels"][:, 1:] != -100).sum()
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((loss / n).item())
    dt = time.perf_counter() - t0
    return {"samples_per_s": steps * batch / dt, "first_loss": losses[0], "last_loss": losses[-1],
            "supervised_tokens": supervised, "seq_len": int(b["input_ids"].shape[1]),
            "prefix_tokens": len(prefix), "cache_hit_rate": cache.hit_rate if cache else None}


def run_trl(size, steps: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from cervl.core.labels import get_label_set
    from cervl.models.loading import lora_target_regex
    from cervl.models.prompts import get_prompt_style

    model, proc = build(size)
    from peft import LoraConfig

    msgs = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], list)
             else [{"type": "text", "text": m["content"]}]}
            for m in get_prompt_style("context").messages(get_label_set("rafdb-compound"))]
    pool = images(4 * batch, size)
    rows = [{"prompt": msgs, "completion": [{"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i % 8]}]}],
             "images": [pool[i % len(pool)]]} for i in range((steps + 1) * batch)]
    cfg = SFTConfig(output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "cervl-trl-bench"), max_steps=steps + 1,
                    per_device_train_batch_size=batch, learning_rate=1e-4, lr_scheduler_type="constant",
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                    completion_only_loss=True, max_length=None, bf16=False, fp16=False, seed=0)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_target_regex())
    # The Qwen2-VL template ends every turn with "<|im_end|>\n", so TRL would also supervise the newline
    # after the answer's <|im_end|>; cervl supervises answer + <|im_end|>. Drop that one newline after
    # assistant turns (prompt tokens are unchanged) so both supervise the same tokens.
    for obj in (proc, proc.tokenizer):
        obj.chat_template = obj.chat_template.replace(
            "{% endfor %}<|im_end|>\n{% endif %}",
            "{% endfor %}<|im_end|>{% if message['role'] != 'assistant' %}\n{% endif %}{% endif %}")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=proc,
                         peft_config=peft_cfg)
    times = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    trainer.add_callback(Clock())
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])  # rows 0..7, in order
    supervised = [int(x) for x in (first["labels"][:, 1:] != -100).sum(1)]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    dt = times[-1] - times[0]
    torch.set_num_threads(torch.get_num_threads())
    return {"samples_per_s": steps * batch / dt, "first_loss": losses[0], "last_loss": losses[-1],
            "supervised_tokens": supervised}


def child(args) -> None:
    size = tuple(int(v) for v in args.size.split("x"))
    out = run_trl(size, args.steps, args.batch) if args.variant == "trl" else \
        run_cervl(args.variant, size, args.steps, args.batch)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="112x112,448x336")
    ap.add_argument("--variants", default=",".join([*VARIANTS, "trl"]))
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    if not (SHARED / "qwen2-vl-tokenizer" / "tokenizer.json").is_file():
        sys.exit(f"needs the real Qwen2-VL tokenizer at {SHARED / 'qwen2-vl-tokenizer'} (set CERVL_SHARED)")
    variants = [v for v in args.variants.split(",") if not (args.no_trl and v == "trl")]
    results: dict = {}
    for size in args.sizes.split(","):
        for r in range(args.repeats):
            for v in variants:  # interleaved: each round runs every variant once
                cmd = [sys.executable, __file__, "--variant", v, "--size", size, "--steps", str(args.steps),
                       "--batch", str(args.batch)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{size} {v}: failed: {err}", flush=True)
                    results.setdefault((size, v), []).append({"error": err})
                    continue
                res = json.loads(line[7:])
                results.setdefault((size, v), []).append(res)
                print(f"{size} round {r + 1} {v:12s} {res['samples_per_s']:7.2f} samples/s  RSS "
                      f"{res['peak_rss_mb']:7.0f} MB  loss {res['first_loss']:.4f} -> {res['last_loss']:.4f}", flush=True)
    print("\n| images | variant | samples/s (median) | vs baseline | vs TRL | peak RSS MB | first -> last loss |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        med = {v: statistics.median(x["samples_per_s"] for x in results[(size, v)] if "error" not in x)
               for v in variants if any("error" not in x for x in results[(size, v)])}
        for v in variants:
            ok = [x for x in results[(size, v)] if "error" not in x]
            if not ok:
                print(f"| {size} | {v} | failed: {results[(size, v)][0]['error'][:80]} | | | | |")
                continue
            rss = statistics.median(x["peak_rss_mb"] for x in ok)
            vs_trl = f"{med[v] / med['trl']:.2f}x" if "trl" in med else "n/a"
            vs_base = f"{med[v] / med['baseline']:.2f}x" if "baseline" in med else "n/a"
            print(f"| {size} | {v} | {med[v]:.2f} | {vs_base} | {vs_trl} | {rss:.0f} | "
                  f"{ok[0]['first_loss']:.3f} -> {ok[0]['last_loss']:.3f} |")
        if "trl" in med and "all" in med:
            trl = [x for x in results[(size, "trl")] if "error" not in x][0]
            ours = [x for x in results[(size, "all")] if "error" not in x][0]
            same = trl["supervised_tokens"] == ours["supervised_tokens"]
            assert same, (trl["supervised_tokens"], ours["supervised_tokens"])
            print(f"\n{size}: supervised tokens per sample cervl {ours['supervised_tokens']} vs TRL "
                  f"{trl['supervised_tokens']} ({'equal' if same else 'DIFFERENT'})")
    if args.out:
        args.out.write_text(json.dumps({f"{s}/{v}": r for (s, v), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
