"""The tiny pretrained base shipped in the package."""

import json
from pathlib import Path

import torch

from cervl.models.loading import build_tiny, load_model
from cervl.models.loading import TINY_BASE as ASSET_BASE


def _strip(d):
    skip = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures", "use_cache"}
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in skip}
    return d


def test_shipped_base_loads_and_matches_the_preset_config():
    assert (ASSET_BASE / "model.safetensors").is_file(), "run `cervl pretrain-tiny`"
    assert not list(ASSET_BASE.glob("*.bin")) and not list(ASSET_BASE.glob("*.pt"))
    size_mb = sum(p.stat().st_size for p in ASSET_BASE.iterdir()) / 2**20
    assert size_mb < 20
    model, proc = load_model(ASSET_BASE, dtype="fp32")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    fresh, fresh_proc = build_tiny("tiny-qwen2-vl")
    from transformers import AutoConfig

    shipped = _strip(AutoConfig.from_pretrained(ASSET_BASE).to_dict())
    expected = _strip(fresh.config.to_dict())
    for key in ("text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id"):
        assert shipped[key] == expected[key], key
    # the in-process tokenizer is deterministic: the shipped one is what the command trains
    assert proc.tokenizer.get_vocab() == fresh_proc.tokenizer.get_vocab()
    assert proc.image_processor.size == fresh_proc.image_processor.size
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in fresh.parameters())
    # and it is not the random init: pretraining changed the weights
    a = dict(model.named_parameters())["model.visual.patch_embed.proj.weight"]
    b = dict(fresh.named_parameters())["model.visual.patch_embed.proj.weight"]
    assert not torch.allclose(a, b)
    provenance = json.loads((ASSET_BASE / "pretrain.json").read_text())
    assert provenance["command"].startswith("cervl pretrain-tiny")


def test_pretrain_tiny_command_produces_the_shipped_architecture(tmp_path):
    """A (very short) real run of `cervl pretrain-tiny` writes a base with the shipped base's config."""
    import subprocess
    import sys

    from transformers import AutoConfig

    root = Path(__file__).resolve().parents[1]
    cfg = (root / "configs" / "pretrain-tiny.yaml").read_text().replace("../runs/pretrain-tiny-data",
                                                                        str(tmp_path / "data"))
    (tmp_path / "pt.yaml").write_text(cfg)
    out = tmp_path / "base"
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "pretrain-tiny", "--config", tmp_path / "pt.yaml",
                          "--per-class", "2", "--warmup-steps", "2", "--workers", "1", "--out", out,
                          f"output_dir={tmp_path / 'run'}", "stages.0.max_steps=2", "stages.0.batch_size=4"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    made = _strip(AutoConfig.from_pretrained(out).to_dict())
    shipped = _strip(AutoConfig.from_pretrained(ASSET_BASE).to_dict())
    for key in ("text_config", "vision_config", "image_token_id", "vision_start_token_id", "model_type"):
        assert made[key] == shipped[key], key
    assert json.loads((out / "pretrain.json").read_text())["vision_warmup_steps"] == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
