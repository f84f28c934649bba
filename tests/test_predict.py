"""Constrained scoring (exact vs brute force), generation, and the predict/eval CLI."""


import numpy as np
import pytest
from PIL import Image

from cervl.core.labels import get_label_set
from cervl.models.loading import TINY_PRESETS, build_tiny
from cervl.predict import Item, LabelScorer, Predictor, generate_answers, score_labels_bruteforce
from cervl.predict.generate import parse_answer
from cervl.models.prompts import get_prompt_style
from helpers import widen_pixels


def _imgs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("tiny-qwen2-vl", seed=4)


@pytest.mark.parametrize("style", ["minimal", "context"])
def test_cached_scoring_equals_bruteforce_tiny_tokenizer(tiny, style):
    model, proc = tiny
    ls, st = get_label_set("rafdb-compound"), get_prompt_style(style)
    imgs = _imgs(5)
    fast = LabelScorer(model, proc, st, ls)(imgs, batch_size=3)
    slow = score_labels_bruteforce(model, proc, st, ls, imgs, batch_size=2)
    assert np.allclose(fast.sum(1), 1.0, atol=1e-6)
    assert np.abs(fast - slow).max() < 1e-5


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_scoring_equals_bruteforce_on_every_family_with_mixed_image_sizes(preset):
    # 19.11: Qwen3-VL had no scoring check, and every test image had the same visual-token count
    model, proc = build_tiny(preset, seed=2, **({"deepstack": (1, 2)} if preset == "tiny-qwen3-vl" else {}))
    widen_pixels(proc)
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in
            [(112, 112), (48, 64), (80, 48), (64, 96)]]
    ls, st = get_label_set("rafdb-compound"), get_prompt_style("context")
    fast = LabelScorer(model, proc, st, ls)(imgs, batch_size=4)
    slow = score_labels_bruteforce(model, proc, st, ls, imgs, batch_size=1)
    assert np.allclose(fast.sum(1), 1.0, atol=1e-6) and np.abs(fast - slow).max() < 1e-5


def test_mean_normalisation_differs_from_sum_and_sums_to_one(tiny):
    model, proc = tiny
    ls, st = get_label_set("rafdb-basic"), get_prompt_style("minimal")
    s = LabelScorer(model, proc, st, ls, normalize="sum")(_imgs(2))
    m = LabelScorer(model, proc, st, ls, normalize="mean")(_imgs(2))
    assert np.allclose(m.sum(1), 1.0) and not np.allclose(s, m)


def test_scoring_with_real_tokenizer_equals_bruteforce(shared_dir):
    model, proc = build_tiny("tiny-qwen2-vl", tokenizer_path=shared_dir / "qwen2-vl-tokenizer", seed=0)
    ls, st = get_label_set("rafdb-compound"), get_prompt_style("context")
    tok = proc.tokenizer
    # the real tokenizer splits class names into several tokens with shared first tokens
    firsts = [tok(c, add_special_tokens=False)["input_ids"][0] for c in ls.classes]
    assert len(set(firsts)) < len(firsts)
    assert max(len(tok(c, add_special_tokens=False)["input_ids"]) for c in ls.classes) >= 3
    imgs = _imgs(2)
    fast = LabelScorer(model, proc, st, ls)(imgs)
    slow = score_labels_bruteforce(model, proc, st, ls, imgs, batch_size=1)
    assert np.abs(fast - slow).max() < 1e-5


def test_batched_generation_matches_unbatched(tiny):
    model, proc = tiny
    ls, st = get_label_set("rafdb-compound"), get_prompt_style("minimal")
    imgs = _imgs(3, seed=1)
    batched = generate_answers(model, proc, st, ls, imgs, max_new_tokens=6)
    single = [generate_answers(model, proc, st, ls, [im], max_new_tokens=6)[0] for im in imgs]
    assert batched == single


def test_predictor_rows_and_bad_image(tiny, tmp_path):
    model, proc = tiny
    good = tmp_path / "a.jpg"
    _imgs(1)[0].save(good)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not an image")
    pred = Predictor(model, proc, "minimal", "rafdb-compound")
    rows = list(pred.predict([Item("a", good, label="Sadly Angry"), Item("b", bad)], progress=False))
    assert rows[0]["pred"] in get_label_set("rafdb-compound") and abs(sum(rows[0]["probs"].values()) - 1) < 1e-5
    assert rows[1]["pred"] is None and "error" in rows[1]
    gen = list(pred.predict([Item("a", good)], mode="generate", progress=False))
    # the row carries the model's own greedy answer and exactly what the parser makes of it
    raw = generate_answers(model, proc, get_prompt_style("minimal"), get_label_set("rafdb-compound"),
                           [Image.open(good).convert("RGB")])[0]
    assert gen[0]["raw"] == raw and gen[0]["pred"] == parse_answer(raw, "rafdb-compound")
