"""Tiny presets of the three families, the image-only processor, the loss mask and LoRA merging."""

import numpy as np
import pytest
import torch
from PIL import Image

from cervl.models.encode import IGNORE, collate, encode_sample, prompt_text
from cervl.core.labels import get_label_set
from cervl.models.loading import (TINY_PRESETS, apply_lora, build_tiny, lora_target_regex, merge_lora, save_model,
                          load_model)
from cervl.models.prompts import get_prompt_style


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("tiny-qwen2-vl", seed=0)


def _img(seed=0, size=112):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_loss_mask_is_exactly_answer_plus_end_of_turn(tiny):
    model, proc = tiny
    ls, style = get_label_set("rafdb-compound"), get_prompt_style("context")
    enc = encode_sample(proc, prompt_text(proc, style, ls), _img(), "Sadly Fearful", max_length=4096)
    tok = proc.tokenizer
    supervised = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE]
    assert tok.decode(supervised) == "Sadly Fearful<|im_end|>"
    first = enc.labels.index(next(l for l in enc.labels if l != IGNORE))
    # every position before the answer (system, definitions, image tokens, assistant header) is masked
    assert all(l == IGNORE for l in enc.labels[:first])
    assert tok.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    n_image = sum(i == image_id for i in enc.input_ids)
    assert n_image == int(enc.image_grid_thw.prod()) // 4 == 49  # 112 px, patch 8, 2x2 merge
    assert len(enc.input_ids) == first + len(supervised)


def test_too_long_sample_names_it(tiny):
    _, proc = tiny
    from cervl.models.encode import SampleTooLong

    with pytest.raises(SampleTooLong, match="train_00042.*max_length=64"):
        encode_sample(proc, prompt_text(proc, get_prompt_style("context"), get_label_set("cexprdb")), _img(), "Sadly Angry",
                      max_length=64, sample_name="train_00042")


def test_collate_pads_right_and_masks(tiny):
    model, proc = tiny
    ls, style = get_label_set("rafdb-basic"), get_prompt_style("minimal")
    a = encode_sample(proc, prompt_text(proc, style, ls), _img(0), "Fear", max_length=4096)
    b = encode_sample(proc, prompt_text(proc, style, ls), _img(1), "Happiness", max_length=4096)
    batch = collate([a, b], proc.tokenizer.pad_token_id, model.config.image_token_id)
    n = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, n)
    assert batch["attention_mask"].sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    assert batch["mm_token_type_ids"].sum().item() == 98
    assert batch["pixel_values"].shape[0] == 2 * 196


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_every_family_forward_and_save_load_roundtrip(preset, tmp_path):
    model, proc = build_tiny(preset, seed=1)
    ls, style = get_label_set("cexprdb"), get_prompt_style("minimal")
    enc = encode_sample(proc, prompt_text(proc, style, ls), _img(), "Sadly Angry", max_length=4096)
    batch = collate([enc], proc.tokenizer.pad_token_id, model.config.image_token_id)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    save_model(model, proc, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded, proc2 = load_model(tmp_path, dtype="fp32")
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert prompt_text(proc2, style, ls) == prompt_text(proc, style, ls)


def test_merge_then_fresh_adapter_keeps_logits(tiny):
    model, proc = build_tiny("tiny-qwen2-vl", seed=2)
    ls, style = get_label_set("rafdb-compound"), get_prompt_style("minimal")
    enc = encode_sample(proc, prompt_text(proc, style, ls), _img(), "Sadly Angry", max_length=4096)
    batch = collate([enc], proc.tokenizer.pad_token_id, model.config.image_token_id)
    batch.pop("labels")
    peft_model = apply_lora(model, rank=16, alpha=32, dropout=0.0, target_regex=lora_target_regex())
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: non-zero B
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.eval()
    with torch.no_grad():
        with_adapter = peft_model(**batch).logits
        merged = merge_lora(peft_model)
        after_merge = merged(**batch).logits
        fresh = apply_lora(merged, rank=8, alpha=16, dropout=0.0, target_regex=lora_target_regex())
        fresh.eval()
        with_fresh = fresh(**batch).logits
    assert (with_adapter - model_logits_without_lora(proc, batch)).abs().max() > 1e-2  # the adapter mattered
    assert torch.allclose(with_adapter, after_merge, atol=1e-4)
    assert torch.allclose(after_merge, with_fresh, atol=1e-6)
    n_lora = sum("lora_A" in n for n, _ in fresh.named_parameters())
    assert n_lora == 4 * 7  # 4 LM layers x (q, k, v, o, gate, up, down); vision tower untouched


def model_logits_without_lora(proc, batch):
    base, _ = build_tiny("tiny-qwen2-vl", seed=2)
    base.eval()
    with torch.no_grad():
        return base(**batch).logits


def test_lora_regex_targets_vision_only_when_asked():
    import re

    lm = re.compile(lora_target_regex())
    vis = re.compile(lora_target_regex(vision="lora", merger="lora"))
    assert lm.match("base_model.model.model.language_model.layers.3.self_attn.q_proj")
    assert not lm.match("base_model.model.model.visual.blocks.0.attn.qkv")
    assert vis.match("base_model.model.model.visual.blocks.0.attn.qkv")
    assert vis.match("model.visual.merger.mlp.0")


def test_image_only_processor_needs_no_torchvision(tiny):
    _, proc = tiny
    assert type(proc).__name__ == "ImageOnlyQwen2VLProcessor"
    assert not hasattr(proc, "video_processor") or proc.video_processor is None


def test_lora_targets_match_real_model_shapes(shared_dir):
    """On the real Qwen2-VL-2B architecture (meta device, no weights) the default LoRA hits exactly
    the 7 projections of all 28 language-model layers and nothing in the vision tower."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(shared_dir / "qwen-vl-shapes" / "qwen2-vl-2b")
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    peft_model = apply_lora(model, rank=16, alpha=32, dropout=0.0, target_regex=lora_target_regex())
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(names) == 28 * 7 and not any(".visual." in n for n in names)


def test_half_precision_on_a_cpu_without_native_support_warns_once(monkeypatch, caplog):
    # 19.12: on an AVX2-only EPYC a 2048x2048 bf16 product ran at 0.28 GFLOP/s against 112 in fp32
    import torch

    from cervl.models import loading as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the flags alone decide here
    models._warn_slow_half.cache_clear()
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    with caplog.at_level("WARNING", logger="cervl.models.loading"):
        assert models.resolve_dtype("bf16") is torch.bfloat16
        models.resolve_dtype("bf16")
        models.resolve_dtype("fp32")
    warnings = [r.getMessage() for r in caplog.records if "slower than fp32" in r.getMessage()]
    assert len(warnings) == 1 and "bf16 on this CPU" in warnings[0] and "model.dtype=fp32" in warnings[0]
    caplog.clear()
    models._warn_slow_half.cache_clear()
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    with caplog.at_level("WARNING", logger="cervl.models.loading"):
        models.resolve_dtype("bf16")
    assert not caplog.records


def test_a_onednn_cap_below_bf16_counts_as_no_native_support(monkeypatch):
    # ONEDNN_MAX_CPU_ISA=AVX2 (with ATEN_CPU_CAPABILITY=avx2) makes this CPU compute bf16 like an AVX2-only one
    from cervl.models import loading as models

    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "amx_bf16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert models.cpu_has_native("bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not models.cpu_has_native("bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert models.cpu_has_native("bf16") and not models.cpu_has_native("fp16")
