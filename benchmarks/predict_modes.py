"""Score vs generate on the same model and images, in one process.

Prints images/s per mode, their ratio, the agreement between modes and generate's invalid rate:
1. trained tiny runs with their own prompts: the quickstart (minimal prompt) and the ablation's context-prompt cell;
2. a larger random-init Qwen2-VL (hidden 512, 8 layers, real-size prompt) where the prompt dominates cost,
   as at real scale (its generated answers are noise, so only its speed is meaningful).

Run: .venv/bin/python benchmarks/predict_modes.py [--runs RUN ...] [--n 48]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cervl.data.mixture import load_samples
from cervl.core.labels import get_label_set
from cervl.models.loading import build_tiny
from cervl.predict import Predictor


def bench(pred: Predictor, images, batch_size: int, label: str) -> None:
    # generation stops at <|im_end|>; cap it at the longest answer (+ end token) so a model that never
    # stops is not charged for extra tokens: the comparison is then generous to generate
    tok = pred.processor.tokenizer
    max_new = max(len(tok(c, add_special_tokens=False)["input_ids"]) for c in pred.label_set.classes) + 1
    pred.score(images[:batch_size], batch_size=batch_size)  # warm-up (also builds the prefix cache)
    t = time.perf_counter()
    probs = pred.score(images, batch_size=batch_size)
    t_score = time.perf_counter() - t
    t = time.perf_counter()
    answers = []
    for i in range(0, len(images), batch_size):
        answers += pred.generate(images[i:i + batch_size], max_new_tokens=max_new)
    t_gen = time.perf_counter() - t
    score_pred = [pred.label_set.classes[i] for i in probs.argmax(1)]
    parsed = [p for _, p in answers]
    invalid = sum(p is None for p in parsed) / len(parsed)
    agree = np.mean([a == b for a, b in zip(score_pred, parsed)])
    n = len(images)
    print(f"{label}\n  score    {n / t_score:8.1f} img/s\n  generate {n / t_gen:8.1f} img/s\n"
          f"  ratio score/generate {t_gen / t_score:5.2f}x   agreement {agree:.1%}   generate invalid {invalid:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, nargs="*",
                    default=[Path("runs/demo/run"), Path("runs/ablation-quickstart/runs/prompt-context")],
                    help="trained runs, each benchmarked with its own prompt (quickstart: minimal; the ablation's "
                         "prompt-context cell: context)")
    ap.add_argument("--manifest", type=Path, default=Path("runs/demo/manifests/synthce-compound-aligned.jsonl"))
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    ls = get_label_set("rafdb-compound")
    images = [s.path for s in load_samples(args.manifest, ["test"], ls)][: args.n]
    for run in args.runs:
        if (run / "final").is_dir():
            pred = Predictor.from_run(run)
            bench(pred, images, args.batch_size, f"{run} ({pred.style.name} prompt), {len(images)} images")
        else:
            print(f"no run at {run}: `make demo` / `cervl ablate configs/ablation-quickstart.yaml` first")
    model, proc = build_tiny("tiny-qwen2-vl", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536,
                             vision_dim=256, vision_depth=4)
    big = Predictor(model, proc, "context", ls)
    bench(big, images[:24], args.batch_size, "random-init hidden 512 x 8 layers, context prompt, 24 images")


if __name__ == "__main__":
    main()
