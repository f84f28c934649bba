"""``cervl pretrain-tiny``: build the tiny pretrained Qwen2-VL stand-in that the quickstart starts from.

Real users start from a pretrained LVLM that already sees faces. The tiny stand-in is made in two
phases on a SynthCE set of its own (seed 1000, disjoint from the demo's data):

1. **Vision warm-up.** The vision tower and merger learn to see action units through a temporary
   linear head over the merged image tokens (position-aware: AUs are local), trained on the
   ground-truth AU intensities. Trained end to end through the language model alone, the vision
   tower of a tiny random-init Qwen2-VL did not learn: the captioning loss settled on the
   language prior and every image got the same caption. The head is discarded afterwards.
2. **AU captioning.** The whole model is fine-tuned on AU-description answers ("inner brows raised,
   lips parted, ...") with the ``au-describe`` prompt (``configs/pretrain-tiny.yaml``), so the
   language model learns to read the image tokens.

The result (safetensors + tokenizer + processor, a few MB) is written to ``--out`` (default
``runs/pretrain-tiny/tiny-base``); the package ships its copy in ``cervl/assets/tiny-base``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cervl.train.config import load_config
from cervl.core.images import load_rgb
from cervl.data.mixture import load_samples
from cervl.data.prepare import prepare_synthce
from cervl.core.errors import InvalidInput
from cervl.core.facs import AU_IDS, au_key
from cervl.core.fsio import swap_in
from cervl.core.labels import get_label_set
from cervl.models.loading import build_tiny, save_model
from cervl.run import claim_run_dir
from cervl.train.recipe import train

log = logging.getLogger(__name__)


def vision_warmup(manifests: list[Path], out: Path, *, steps: int = 400, batch_size: int = 32, lr: float = 2e-3,
                  seed: int = 0, preset: str = "tiny-qwen2-vl", progress: bool = True) -> dict:
    """Phase 1: train vision tower + merger of a fresh tiny preset to regress AU intensities; save the model."""
    torch.manual_seed(seed)
    model, processor = build_tiny(preset, seed=seed)
    samples = []
    for m in manifests:
        samples += load_samples(m, ["train", "val", "test"], get_label_set("rafdb-compound"), need_aus=True,
                               need_labels=False)
    ip = processor.image_processor  # min_pixels == max_pixels for tiny presets: a fixed token count
    n_tokens = ip.size["longest_edge"] // ip.patch_size**2 // 4
    head = torch.nn.Linear(model.config.text_config.hidden_size * n_tokens, len(AU_IDS))
    params = list(model.model.visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    rng = np.random.default_rng(seed)
    model.train()
    bar = tqdm(range(steps), desc="vision warm-up", disable=not progress)
    losses = []
    for step in bar:
        batch = [samples[i] for i in rng.choice(len(samples), batch_size, replace=False)]
        enc = processor.image_processor([load_rgb(s.path) for s in batch], return_tensors="pt")
        target = torch.tensor([[s.record.aus[au_key(a)] for a in AU_IDS] for s in batch], dtype=torch.float32)
        feats = model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True).pooler_output
        logits = head(torch.stack([f.flatten() for f in feats]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    save_model(model, processor, out)
    return {"steps": steps, "final_loss": float(np.mean(losses[-20:])), "samples": len(samples)}


def pretrain_tiny(config_path: Path, overrides: list[str], *, per_class: int, out: Path, workers: int,
                  warmup_steps: int, progress: bool = True) -> Path:
    """Generate data, run both phases, and install the result at ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out)  # before hours of work, not after
    cfg = load_config(config_path, overrides)
    manifests = Path(cfg.stages[0].data[0].manifest).parent
    prepare_synthce(manifests / "synthce", manifests, per_class=per_class, seed=1000, prefix="", val_fraction=0.05,
                    workers=workers)
    claim_run_dir(Path(cfg.output_dir))  # the warm-up writes into the run folder before training does
    warm_dir = Path(cfg.output_dir) / "vision-warmup"
    if not (warm_dir / "model.safetensors").is_file():
        info = vision_warmup([manifests / "basic-aligned.jsonl", manifests / "compound-aligned.jsonl"], warm_dir,
                             steps=warmup_steps, progress=progress)
        (warm_dir / "warmup.json").write_text(json.dumps(info, indent=2) + "\n")
    cfg.model.name = str(warm_dir)
    result = train(cfg, progress=progress)
    final = Path(result["run_dir"]) / "final"
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # ours alone: safe to remove
    tmp = scratch / "new"
    shutil.copytree(final, tmp, ignore=shutil.ignore_patterns("cervl.json"))
    metrics = sorted((Path(result["run_dir"]) / "stages").glob("*/metrics.csv"))
    try:
        config_name = str(Path(config_path).resolve().relative_to(Path.cwd()))
    except ValueError:
        config_name = str(config_path)
    provenance = {"command": "cervl pretrain-tiny " + " ".join(overrides), "config": config_name,
                  "per_class": per_class, "synth_seed": 1000, "vision_warmup_steps": warmup_steps,
                  "minutes": round((time.perf_counter() - t0) / 60, 1),
                  "caption_metrics_last_row": [p.read_text().splitlines()[-1] for p in metrics]}
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    swap_in(tmp, out, scratch / "old")  # through a scratch folder of ours: nothing of anyone else's is removed
    shutil.rmtree(scratch, ignore_errors=True)
    return out


PROVENANCE = "pretrain.json"


def check_output(out: Path) -> None:
    """``out`` must be new, empty, or a tiny base this command wrote (it is replaced as a whole)."""
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / PROVENANCE).read_text()).get("command", "").startswith("cervl pretrain-tiny")
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise InvalidInput(f"--out {out} is not empty and is not a tiny base written by cervl pretrain-tiny "
                               f"(no {PROVENANCE}); cervl replaces that folder, so choose a new or empty one")
