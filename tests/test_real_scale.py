"""Real layer widths: the staged recipe on the Qwen2-VL-2B and Qwen2.5-VL-3B shapes (layers cut to 2).

Real hidden sizes, head counts (grouped-query attention), intermediate sizes, vision width and merger,
the real tokenizer and image-processor settings, the context prompt, 112x112 and 448x336 images.
Stage 1 (LoRA r16) -> merge -> stage 2 (fresh LoRA r8) -> save -> reload -> score and generate, in
fp32 and bf16 on the CPU. Skips cleanly without ``../shared``.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cervl.data.manifest import Record, write_manifest

SHARED = Path(os.environ.get("CERVL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
# Sized by what the CPU does natively: without AVX-512 BF16 or AMX, torch emulates bf16 matrix products (an
# AVX2-only EPYC ran this file's bf16 cases for most of a 46-minute suite). There the bf16 run keeps every step
# (train, merge, save, reload, score, generate) on 112x112 images only, against an fp32 run of the same images.
FULL, SMALL = [(112, 112), (448, 336)] * 2, [(112, 112)] * 4


def _native_bf16() -> bool:
    from cervl.models.loading import cpu_has_native

    return cpu_has_native("bf16")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "qwen-vl-shapes").is_dir(), reason=f"no real shapes at {SHARED}")]


def real_base(folder: Path, name: str) -> Path:
    """A real-width model (2 text and 2 vision layers, random weights) saved as a cervl base folder."""
    from transformers import AutoConfig, AutoTokenizer

    from cervl.models.loading import _transformers_attr, get_family, make_image_processor, make_processor, save_model

    cfg = AutoConfig.from_pretrained(SHARED / "qwen-vl-shapes" / name)
    cfg.text_config.num_hidden_layers = 2
    if getattr(cfg.text_config, "layer_types", None):
        cfg.text_config.layer_types = cfg.text_config.layer_types[:2]
    cfg.vision_config.depth = 2
    if hasattr(cfg.vision_config, "fullatt_block_indexes"):
        cfg.vision_config.fullatt_block_indexes = [1]
    family = get_family(cfg.model_type)
    torch.manual_seed(0)
    model = _transformers_attr(family.model_class)(cfg).float()
    tok = AutoTokenizer.from_pretrained(SHARED / "qwen2-vl-tokenizer")
    # Qwen2-VL's own defaults: 56*56 .. 28*28*1280 pixels (16 visual tokens for 112x112, 192 for 448x336)
    proc = make_processor(family, make_image_processor(family, 56 * 56, 28 * 28 * 1280), tok)
    save_model(model, proc, folder)
    return folder


def manifest(folder: Path, label_set: str, classes: list[str], sizes: list = FULL) -> Path:
    rng = np.random.default_rng(len(classes))
    recs = []
    folder = folder / ("full" if sizes == FULL else "small")
    for i, size in enumerate(sizes):
        path = folder / label_set / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        recs.append(Record(image=str(path), label=classes[i % len(classes)], label_set=label_set, split="train",
                           dataset="folder", id=f"{label_set}-{i}"))
    out = folder / f"{label_set}.jsonl"
    write_manifest(out, recs)
    return out


def staged_run(tmp: Path, base: Path, dtype: str, sizes: list = FULL, tag: str | None = None) -> Path:
    from cervl.train.config import load_config
    from cervl.core.labels import get_label_set
    from cervl.train.recipe import train

    basic = manifest(tmp / "data", "rafdb-basic", list(get_label_set("rafdb-basic").classes), sizes)
    compound = manifest(tmp / "data", "rafdb-compound", list(get_label_set("rafdb-compound").classes), sizes)
    stage = {"prompt": "context", "max_steps": 2, "batch_size": 2, "lr": 1e-3, "seed": 0}
    cfg = {"model": {"name": str(base), "dtype": dtype}, "output_dir": str(tmp / f"run-{tag or dtype}"),
           "checkpoint_every": 0, "log_every": 1, "save": "merged",
           "stages": [{"name": "basic", "data": [{"manifest": str(basic)}], "label_set": "rafdb-basic",
                       "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}, **stage},
                      {"name": "compound", "data": [{"manifest": str(compound)}], "label_set": "rafdb-compound",
                       "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, **stage}]}
    (tmp / f"{tag or dtype}.yaml").write_text(json.dumps(cfg))
    return Path(train(load_config(tmp / f"{tag or dtype}.yaml", []), progress=False)["run_dir"])


def losses(run: Path) -> list[float]:
    out = []
    for f in sorted(run.glob("stages/*/metrics.csv")):
        out += [float(r["loss"]) for r in csv.DictReader(f.open()) if r.get("loss")]
    return out


@pytest.fixture(scope="module", params=["qwen2-vl-2b", "qwen2.5-vl-3b"])
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    base = real_base(tmp / "base", request.param)
    runs = {"fp32": staged_run(tmp, base, "fp32")}
    if request.param == "qwen2-vl-2b":
        if _native_bf16():
            runs["bf16"] = staged_run(tmp, base, "bf16")
        else:  # emulated bf16: small images, and an fp32 run of the same images for the loss comparison
            runs["bf16"] = staged_run(tmp, base, "bf16", SMALL)
            runs["fp32-small"] = staged_run(tmp, base, "fp32", SMALL, tag="fp32-small")
    return request.param, base, runs


def test_lora_targets_are_the_real_models(runs):
    name, _, by_dtype = runs
    for run in by_dtype.values():
        for stage, rank in (("basic", 16), ("compound", 8)):
            cfg = json.loads(next(run.glob(f"stages/*{stage}/adapter/adapter_config.json")).read_text())
            assert cfg["r"] == rank
            from safetensors import safe_open

            with safe_open(next(run.glob(f"stages/*{stage}/adapter/adapter_model.safetensors")), "pt") as f:
                mods = {k.split(".lora_")[0] for k in f.keys() if ".lora_A." in k}
            # 2 layers x 7 projections (q k v o gate up down), none in the vision tower or merger
            assert len(mods) == 14 and not any("visual" in m for m in mods), sorted(mods)


def test_scoring_equals_bruteforce_and_generation_runs(runs):
    from cervl.predict import Predictor, score_labels_bruteforce

    name, _, by_dtype = runs
    rng = np.random.default_rng(7)
    sizes = ((112, 112), (448, 336)) if name == "qwen2-vl-2b" else ((112, 112),)  # time: the 3B once, small
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    for tag, run in by_dtype.items():
        dtype = tag.split("-")[0]
        ims = images if dtype == "fp32" or _native_bf16() else images[:1]  # emulated bf16: 112x112 only
        pred = Predictor.from_run(run, dtype=dtype)
        fast = pred.score(ims, batch_size=2)
        slow = score_labels_bruteforce(pred.model, pred.processor, pred.style, pred.label_set, ims, batch_size=1)
        assert fast.shape == (len(ims), 11) and np.allclose(fast.sum(1), 1, atol=1e-3)
        assert np.abs(fast - slow).max() < (1e-4 if dtype == "fp32" else 2e-2), (tag, np.abs(fast - slow).max())
        answers = pred.generate(ims, max_new_tokens=3)
        assert len(answers) == len(ims) and all(isinstance(raw, str) for raw, _ in answers)


def test_merged_model_equals_base_plus_adapters(runs):
    """final/ (stage 2 merged) gives the logits of the stage-1-merged base with stage 2's adapter active."""
    from peft import PeftModel

    from cervl.models.loading import load_model
    from cervl.run import RunMeta, apply_stage

    _, base, by_dtype = runs
    run = by_dtype["fp32"]
    meta = RunMeta.read(run)
    merged, proc = load_model(run / "final", dtype="fp32")
    stacked, _ = load_model(base, dtype="fp32")
    stacked = apply_stage(stacked, meta.lineage[1], run)  # stage 1, merged as the trainer did
    stacked = PeftModel.from_pretrained(stacked, next(run.glob("stages/*compound/adapter")))  # stage 2, unmerged
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (336, 448, 3), dtype=np.uint8))
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": "Emotion?"}]}],
                                              tokenize=False, add_generation_prompt=True)
    batch = proc(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        a, b = merged(**batch).logits, stacked(**batch).logits
    assert (a - b).abs().max() / b.abs().max() < 1e-4


def test_bf16_losses_track_fp32(runs):
    _, _, by_dtype = runs
    if "bf16" not in by_dtype:
        pytest.skip("bf16 runs on the 2B shape only (time)")
    fp32, bf16 = losses(by_dtype.get("fp32-small", by_dtype["fp32"])), losses(by_dtype["bf16"])  # same images
    assert len(fp32) == len(bf16) == 4
    assert np.allclose(bf16, fp32, rtol=0.03), (fp32, bf16)
