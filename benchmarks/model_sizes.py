"""Real Qwen-VL sizes from config (random weights on the meta device): parameters, LoRA size, memory plan.

Uses the config files of ../shared/qwen-vl-shapes (or $CERVL_SHARED); no weights are downloaded.
Memory is the static part of LoRA training: bf16 base weights + fp32 LoRA weights, gradients and AdamW
states (activations come on top and depend on batch size and sequence length).

Run: .venv/bin/python benchmarks/model_sizes.py
"""

import os
from pathlib import Path

import torch
from transformers import AutoConfig

from cervl.models.loading import _transformers_attr, apply_lora, get_family, lora_target_regex

SHARED = Path(os.environ.get("CERVL_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    shapes = SHARED / "qwen-vl-shapes"
    if not shapes.is_dir():
        print(f"no model shapes at {shapes} (set CERVL_SHARED)")
        return
    print(f"{'model':16s} {'params':>8s} {'vision':>8s} {'LoRA r16':>9s} {'LoRA r8':>8s} {'modules':>7s} "
          f"{'static GiB (r16)':>16s}")
    for d in sorted(p for p in shapes.iterdir() if (p / "config.json").is_file()):
        cfg = AutoConfig.from_pretrained(d)
        cls = _transformers_attr(get_family(cfg.model_type).model_class)
        sizes = {}
        for rank in (16, 8):
            with torch.device("meta"):
                model = cls(cfg)
            total = sum(p.numel() for p in model.parameters())
            vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
            peft = apply_lora(model, rank=rank, alpha=2 * rank, dropout=0.0, target_regex=lora_target_regex())
            sizes[rank] = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
            modules = sum(1 for n, _ in peft.named_modules() if n.endswith("lora_A"))
        static = (2 * total + 16 * sizes[16]) / 2**30  # bf16 weights; fp32 LoRA weight + grad + 2 Adam moments
        print(f"{d.name:16s} {total / 1e9:7.2f}B {vision / 1e6:7.0f}M {sizes[16] / 1e6:8.1f}M {sizes[8] / 1e6:7.1f}M "
              f"{modules:7d} {static:16.1f}")


if __name__ == "__main__":
    main()
