"""The training objective's levers are exact: answer-only logits, shared-prefix forward, vision cache.

Each lever is compared with the plain full-sequence forward (logits everywhere, cross-entropy over the
supervised positions): the loss and every LoRA gradient must agree to fp32 tolerance.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cervl.models.encode import IGNORE, collate, encode_sample, prompt_text
from cervl.core.labels import get_label_set
from cervl.models.loading import ACCEPTS_ENCODER_OUTPUTS, TINY_PRESETS, apply_lora, build_tiny, lora_target_regex
from cervl.train.objective import MIN_SHARED_PREFIX, AnswerObjective, VisionCache, core_and_head
from cervl.models.prompts import get_prompt_style
from helpers import widen_pixels


def _images(n, size=(112, 112), seed=0):
    """``n`` random images of ``size``, or of each size in a list of sizes."""
    rng = np.random.default_rng(seed)
    sizes = size if isinstance(size, list) else [size] * n
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def _batch(model, proc, answers, size=(112, 112)):
    ls, style = get_label_set("rafdb-compound"), get_prompt_style("context")
    text = prompt_text(proc, style, ls)
    enc = [encode_sample(proc, text, im, a, max_length=8192) for im, a in zip(_images(len(answers), size), answers)]
    tok = proc.tokenizer
    batch = collate(enc, tok.pad_token_id or 0, model.config.image_token_id)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = ids[: ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))]
    return batch, prefix


def _reference(model, batch):
    """The plain way: logits at every position, cross-entropy where labels are supervised."""
    b = dict(batch)
    labels = b.pop("labels")
    logits = model(**b).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction="sum")


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _lora(model):
    torch.manual_seed(0)
    model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_regex=lora_target_regex())
    with torch.no_grad():  # a non-zero B so that every LoRA matrix gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def _assert_same(ref, got, rtol=1e-5):
    (l0, g0), (l1, g1) = ref, got
    assert torch.allclose(l0, l1, rtol=rtol, atol=0), (l0.item(), l1.item())
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        scale = g0[n].abs().max().clamp(min=1e-12)
        assert ((g0[n] - g1[n]).abs().max() / scale) < 1e-4, n


def _check_levers(model, proc, answers, size=(112, 112)):
    batch, prefix = _batch(model, proc, answers, size)
    assert len(prefix) >= MIN_SHARED_PREFIX
    ref = _loss_and_grads(model, lambda: _reference(model, batch))
    answer_only = AnswerObjective(model)
    _assert_same(ref, _loss_and_grads(model, lambda: answer_only(**batch)))
    shared = AnswerObjective(model, prefix=prefix)
    _assert_same(ref, _loss_and_grads(model, lambda: shared(**batch)))
    assert shared.shared_batches == 1
    assert shared.lever_record() == {"shared_prefix_tokens": len(prefix), "shared_prefix_batches": 1,
                                     "plain_batches": 0, "vision_cache_hits": None, "vision_cache_misses": None,
                                     "vision_cache_hit_rate": None}
    # 19.10: a batch that does not start with the prefix runs the plain forward, and DONE.json says so
    other = AnswerObjective(model, prefix=[t + 1 for t in prefix])
    _assert_same(ref, _loss_and_grads(model, lambda: other(**batch)))
    assert other.lever_record()["shared_prefix_tokens"] == 0 and other.lever_record()["plain_batches"] == 1
    cache = VisionCache(model, proc, None, 64)
    if not ACCEPTS_ENCODER_OUTPUTS:  # older transformers: the cache is refused, not silently wrong
        with pytest.raises(ValueError, match="no precomputed image features"):
            AnswerObjective(model, prefix=prefix, vision_cache=cache)
        return ref
    cached = AnswerObjective(model, prefix=prefix, vision_cache=cache)
    hashes = [f"img{i}" for i in range(len(answers))]
    for _ in range(2):  # first pass fills the cache, second reads it
        _assert_same(ref, _loss_and_grads(model, lambda: cached(**batch, image_hashes=hashes)))
    assert cache.hits == len(answers) and cache.misses == len(answers) and cache.hit_rate == 0.5
    assert cached.lever_record()["vision_cache_hits"] == len(answers) == cached.lever_record()["vision_cache_misses"]
    return ref


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_levers_are_exact_on_tiny_models(preset):
    model, proc = build_tiny(preset, seed=1)
    _check_levers(_lora(model), proc, ["Sadly Angry", "Happily Surprised", "Fearfully Angry"])


MIXED = [(112, 112), (48, 64), (80, 48)]  # 49, 12 and 15 visual tokens after the 2x2 merge (patch 8)


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_levers_are_exact_with_different_visual_token_counts(preset):
    # 19.11: the tiny processors fix min = max pixels, so every image used to have the same token count
    model, proc = build_tiny(preset, seed=1)
    widen_pixels(proc)
    batch, _ = _batch(model, proc, ["Sadly Angry", "Happily Surprised", "Fearfully Angry"], MIXED)
    tokens = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert len(set(tokens)) == 3, tokens
    _check_levers(_lora(model), proc, ["Sadly Angry", "Happily Surprised", "Fearfully Angry"], MIXED)


def test_levers_are_exact_with_qwen3_deepstack_features():
    # 19.11: the vision cache stores deepstack features ("d0", "d1") only when the indexes are non-empty
    model, proc = build_tiny("tiny-qwen3-vl", seed=1, deepstack=(1, 2))
    assert list(model.config.vision_config.deepstack_visual_indexes) == [1, 2]
    cache = VisionCache(model, proc, None, 64)
    batch, _ = _batch(model, proc, ["Sadly Angry", "Happily Surprised"])
    cache.features(core_and_head(model)[0], batch["pixel_values"], batch["image_grid_thw"], ["x", "y"])
    assert sorted(cache.get(cache.key("x"))) == ["d0", "d1", "f"]
    _check_levers(_lora(model), proc, ["Sadly Angry", "Happily Surprised", "Fearfully Angry"])


def test_vision_cache_key_changes_with_the_vision_weights(tmp_path):
    model, proc = build_tiny("tiny-qwen2-vl", seed=1)
    a = VisionCache(model, proc, tmp_path, 0)
    with torch.no_grad():
        next(model.model.visual.parameters()).add_(1e-3)
    b = VisionCache(model, proc, tmp_path, 0)
    assert a.key("same-image") != b.key("same-image")
    # over the memory budget, entries go to safetensors files and come back identical
    t = torch.randn(16, 128)
    a.put(a.key("x"), {"f": t})
    assert (tmp_path / f"{a.key('x')}.safetensors").is_file() and torch.equal(a.get(a.key("x"))["f"], t)


def _real_width(shared_dir, name, layers=2):
    from transformers import AutoConfig, AutoTokenizer

    from cervl.models.loading import get_family, make_image_processor, make_processor, _transformers_attr

    cfg = AutoConfig.from_pretrained(shared_dir / "qwen-vl-shapes" / name)
    cfg.text_config.num_hidden_layers = layers
    if hasattr(cfg.text_config, "layer_types") and cfg.text_config.layer_types:
        cfg.text_config.layer_types = cfg.text_config.layer_types[:layers]
    cfg.vision_config.depth = layers
    if hasattr(cfg.vision_config, "fullatt_block_indexes"):
        cfg.vision_config.fullatt_block_indexes = [layers - 1]
    family = get_family(cfg.model_type)
    torch.manual_seed(0)
    model = _transformers_attr(family.model_class)(cfg).float()
    tok = AutoTokenizer.from_pretrained(shared_dir / "qwen2-vl-tokenizer")
    proc = make_processor(family, make_image_processor(family, 56 * 56, 28 * 28 * 1280), tok)
    return model, proc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2-vl-2b", "qwen2.5-vl-3b"])
def test_levers_are_exact_at_real_width(shared_dir, name):
    model, proc = _real_width(shared_dir, name)
    _check_levers(_lora(model), proc, ["Sadly Angry", "Happily Surprised"], size=(112, 112))


def test_shapes_listed(shared_dir):
    names = sorted(p.name for p in (shared_dir / "qwen-vl-shapes").iterdir())
    assert "qwen2-vl-2b" in names and json.loads((shared_dir / "qwen-vl-shapes" / "qwen2-vl-2b" / "config.json")
                                                .read_text())["model_type"] == "qwen2_vl"


SPILL = """import sys
from pathlib import Path
import torch
from cervl.train.objective import VisionCache
c = VisionCache.__new__(VisionCache)
c.folder, c.budget, c.used, c.memory = Path(sys.argv[1]), 0, 0, {}
for i in range(400):
    c.put("samekey", {"f": torch.full((64, 32), float(i))})
"""


def test_two_processes_spilling_the_same_key(tmp_path):
    # 19.6: both ranks wrote ".samekey.tmp"; one renamed the other's file away and crashed
    import subprocess
    import sys

    from safetensors.torch import load_file

    procs = [subprocess.Popen([sys.executable, "-c", SPILL, str(tmp_path)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samekey.safetensors"]  # no temporary file left
    f = load_file(tmp_path / "samekey.safetensors")["f"]
    assert f.shape == (64, 32) and bool((f == f[0, 0]).all())  # one whole write, not a mix
