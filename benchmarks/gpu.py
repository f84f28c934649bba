"""One prepared GPU benchmark (single H200, < 8 min): real Qwen2-VL shapes, random weights, bf16, SDPA.

    PYTHONPATH=src python3 benchmarks/gpu.py --out DIR [--shapes ../shared/qwen-vl-shapes] [--tokenizer ...]
    PYTHONPATH=src python3 benchmarks/gpu.py --smoke --out DIR      # the same code on CPU, tiny model, seconds

For the Qwen2-VL-2B and 7B shapes it measures LoRA r16 training samples/s at 112x112 with the context
prompt (cervl's objective: answer-only logits, shared prefix, vision cache) and the MFU from counted
FLOPs, peak GPU memory, score and generate images/s at batch 32, and the projected wall-clock of the
paper's recipe (RAF-DB basic 12,271 x 20 + compound 3,162 x 10 sample passes, plus ``--affwild2`` samples
per stage-1 epoch). Writes ``DIR/gpu.json`` and prints a table. Needs no network and no cervl install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = Path(os.environ.get("CERVL_SHARED", ROOT.parent / "shared"))
H200_BF16_FLOPS = 989e12  # dense bf16 peak of the H100/H200 SXM tensor cores (MFU denominator)
PAPER_SAMPLES = 12_271 * 20 + 3_162 * 10


def build(name: str | None, device: str, dtype: torch.dtype, tokenizer: Path | None):
    from transformers import AutoConfig, AutoTokenizer

    from cervl.models.loading import (_transformers_attr, build_tiny, get_family, make_image_processor, make_processor)

    if name is None:  # smoke: the tiny preset
        model, proc = build_tiny("tiny-qwen2-vl", tokenizer_path=tokenizer)
        return model.to(device, dtype), proc
    cfg = AutoConfig.from_pretrained(name)
    family = get_family(cfg.model_type)
    with torch.device(device):
        model = _transformers_attr(family.model_class)._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    proc = make_processor(family, make_image_processor(family, 56 * 56, 28 * 28 * 1280), tok)
    return model, proc


def train_rate(model, proc, device: str, batch: int, steps: int) -> dict:
    import numpy as np
    from PIL import Image

    from cervl.models.encode import collate, encode_sample, prompt_text
    from cervl.core.labels import get_label_set
    from cervl.models.loading import apply_lora, lora_target_regex
    from cervl.models.loading import ACCEPTS_ENCODER_OUTPUTS
    from cervl.train.objective import AnswerObjective, VisionCache
    from cervl.models.prompts import get_prompt_style

    ls = get_label_set("rafdb-compound")
    text = prompt_text(proc, get_prompt_style("context"), ls)
    tok = proc.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = ids[: ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))]
    model = apply_lora(model, rank=16, alpha=32, dropout=0.05, target_regex=lora_target_regex())
    # transformers before 5.2x takes no precomputed image features: train without the vision cache there,
    # as decide_levers does (each timed step sees new images anyway, so the cache would only show its cost)
    cache = VisionCache(model, proc, None, 8192) if ACCEPTS_ENCODER_OUTPUTS else None
    objective = AnswerObjective(model, prefix=prefix, vision_cache=cache)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    pool = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(batch)]
    enc = [encode_sample(proc, text, im, ls.classes[i % len(ls)], max_length=16384) for i, im in enumerate(pool)]
    b = collate(enc, tok.pad_token_id or 0, model.config.image_token_id)
    b = {k: v.to(device) for k, v in b.items()}
    b["image_hashes"] = [f"img{i}" for i in range(batch)]  # epochs >= 2: the cache holds every image
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in range(steps + 2):
        if step == 2:
            sync()
            t0 = time.perf_counter()
        loss = objective(**b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    dt = (time.perf_counter() - t0) / steps
    seq, p = b["input_ids"].shape[1], len(prefix)
    n_text = sum(v.numel() for k, v in model.named_parameters() if "visual" not in k and "lora_" not in k)
    tokens = p + batch * (seq - p)  # the prefix once, every suffix
    flops = 4 * n_text * tokens  # forward 2N + backward through activations 2N (LoRA: frozen base weights)
    return {"seq_len": seq, "prefix": p, "vision_cache": cache is not None, "step_s": dt, "samples_per_s": batch / dt,
            "tflops": flops / dt / 1e12, "mfu": flops / dt / H200_BF16_FLOPS, "loss": loss.item(), "model": model}


def score_rates(model, proc, batch: int, device: str) -> dict:
    import numpy as np
    from PIL import Image

    from cervl.predict import Predictor

    rng = np.random.default_rng(1)
    ims = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(batch)]
    pred = Predictor(model.merge_and_unload() if hasattr(model, "merge_and_unload") else model, proc, "context",
                     "rafdb-compound")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for mode, fn in (("score", lambda: pred.score(ims, batch_size=batch)),
                     ("generate", lambda: pred.generate(ims, max_new_tokens=8))):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        out[f"{mode}_img_s"] = 3 * batch / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps: checks the script runs")
    ap.add_argument("--shapes", type=Path, default=SHARED / "qwen-vl-shapes")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "qwen2-vl-tokenizer")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--affwild2", type=int, default=0, help="Aff-Wild2 samples added to each stage-1 epoch")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    targets = [("tiny", None)] if args.smoke else [("qwen2-vl-2b", args.shapes / "qwen2-vl-2b"),
                                                   ("qwen2-vl-7b", args.shapes / "qwen2-vl-7b")]
    tokenizer = args.tokenizer if args.tokenizer.is_dir() else None
    results = {}
    for label, path in targets:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, proc = build(str(path) if path else None, device, dtype, tokenizer)
        r = train_rate(model, proc, device, 4 if args.smoke else args.batch, 2 if args.smoke else args.steps)
        model = r.pop("model")
        r.update(score_rates(model, proc, 4 if args.smoke else args.batch, device))
        r["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        samples = PAPER_SAMPLES + 20 * args.affwild2
        r["paper_recipe_hours"] = samples / r["samples_per_s"] / 3600
        results[label] = r
        del model
        print(f"{label}: {r['samples_per_s']:.1f} samples/s (step {r['step_s']:.3f} s, seq {r['seq_len']}, prefix "
              f"{r['prefix']}), {r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}, score {r['score_img_s']:.1f} img/s, "
              f"generate {r['generate_img_s']:.1f} img/s, peak GPU {r['peak_gpu_gb'] or 0:.1f} GB, paper recipe "
              f"{r['paper_recipe_hours']:.2f} h", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else
                                                   "cpu (smoke)", "torch": torch.__version__, **results}, indent=2))
    print(f"wrote {args.out / 'gpu.json'}")


if __name__ == "__main__":
    main()
