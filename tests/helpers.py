"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""

import subprocess
import sys
from pathlib import Path

import yaml


def train_quick(base: Path, manifest: Path, model: str = "tiny-qwen2-vl", label_set: str = "rafdb-compound",
                name: str = "run") -> Path:
    """Train a one-stage, two-step LoRA run on ``manifest`` with the real command; return the run folder."""
    cfg = {"model": {"name": model}, "output_dir": str(base / name), "checkpoint_every": 0,
           "stages": [{"name": "stage", "data": [{"manifest": str(manifest)}],
                       "label_set": label_set, "prompt": "minimal", "max_steps": 2, "batch_size": 4,
                       "lr": 1e-3, "lora": {"rank": 4, "alpha": 8}}]}
    (base / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "train", str(base / f"{name}.yaml"), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return base / name


def widen_pixels(processor, low: int = 32 * 32, high: int = 112 * 112) -> None:
    """Let the processor keep each image's own size between ``low`` and ``high`` pixels, so that images of
    different sizes get different visual-token counts (the tiny presets fix min = max)."""
    ip = processor.image_processor
    ip.min_pixels, ip.max_pixels = low, high
    ip.size = {"shortest_edge": low, "longest_edge": high}
