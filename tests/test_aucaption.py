"""The au-caption mode (issue 23, item 4): AUs, then the label; exact label scoring; per-AU F1 in eval."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cervl.data.manifest import Record, write_manifest
from cervl.models.encode import collate, encode_sample, pad_id, prompt_text, token_logprobs
from cervl.core.facs import AU_IDS, describe_aus
from cervl.models.loading import TINY_BASE, load_model
from cervl.predict import Predictor
from cervl.predict.aucaption import split_answer
from cervl.predict.predictor import Item
from cervl.models.prompts import caption_aus, get_prompt_style
from cervl.evaluate.report import evaluate_predictions


@pytest.mark.parametrize("seed", range(5))
def test_caption_aus_reads_back_every_caption(seed):
    rng = np.random.default_rng(seed)
    aus = {a: float(rng.random() < 0.4) for a in AU_IDS}
    assert caption_aus(describe_aus(aus)) == sorted(a for a, v in aus.items() if v)


def test_au_caption_answer_is_the_caption_then_the_label():
    st = get_prompt_style("au-caption")
    ans = st.answer("Sadly Angry", {"AU04": 0.9, "AU15": 0.7, "AU12": 0.1})
    assert ans == "brows lowered and drawn together, lip corners pulled down. Expression: Sadly Angry"
    assert split_answer(ans) == "brows lowered and drawn together, lip corners pulled down"
    assert get_prompt_style("au-describe").answer(None, {"AU04": 0.9}) == "brows lowered and drawn together"
    with pytest.raises(ValueError, match="unlabelled"):
        st.answer(None, {"AU04": 0.9})


@pytest.fixture(scope="module")
def base():
    return load_model(TINY_BASE, dtype="fp32")


def test_au_caption_scores_are_the_training_likelihoods_of_each_full_answer(base):
    """The class probabilities equal a softmax over log p(caption + class) computed the way training encodes it."""
    model, proc = base
    p = Predictor(model, proc, "au-caption", "rafdb-basic")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    rows = list(p.predict([Item(id=str(i), image=f"{i}.png", crop=im) for i, im in enumerate(imgs)], progress=False))
    text = prompt_text(proc, p.style, p.label_set)
    for row, img in zip(rows, imgs):
        assert row["caption"] and row["aus"] == [f"AU{a:02d}" for a in caption_aus(row["caption"])]
        by_hand = []
        for c in p.label_set.classes:
            enc = encode_sample(proc, text, img, f"{row['caption']}. Expression: {c}", max_length=4096)
            batch = collate([enc], pad_id(proc.tokenizer), model.config.image_token_id)
            labels = batch.pop("labels")
            with torch.no_grad():
                logits = model(**batch).logits
            by_hand.append(float(token_logprobs(logits, labels).sum()))
        expect = torch.softmax(torch.tensor(by_hand), 0).numpy()
        got = np.array([row["probs"][c] for c in p.label_set.classes])
        assert np.abs(got - expect).max() < 1e-4 and row["pred"] == p.label_set.classes[int(expect.argmax())]


def test_eval_reports_per_au_f1_against_the_manifest(tmp_path):
    common = {"label_set": "rafdb-compound", "split": "test", "dataset": "synthce"}
    recs = [Record(id="a", image="a.jpg", label="Sadly Angry", aus={"AU04": 0.9, "AU15": 0.6, "AU12": 0.1}, **common),
            Record(id="b", image="b.jpg", label="Happily Surprised", aus={"AU12": 0.8, "AU25": 0.7, "AU04": 0.0},
                   **common)]
    write_manifest(tmp_path / "m.jsonl", recs)
    rows = [{"id": "a", "image": "a.jpg", "label": "Sadly Angry", "pred": "Sadly Angry", "aus": ["AU04", "AU12"]},
            {"id": "b", "image": "b.jpg", "label": "Happily Surprised", "pred": "Sadly Angry", "aus": ["AU12"]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.jsonl.meta.json").write_text(json.dumps({"label_set": "rafdb-compound",
                                                            "manifest": str(tmp_path / "m.jsonl")}))
    m = evaluate_predictions(tmp_path / "p.jsonl", tmp_path / "rep")
    au = m["per_au"]
    assert au["AU04"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert au["AU12"]["precision"] == 0.5 and au["AU12"]["recall"] == 1.0  # named on a, where it is at 0.1
    assert au["AU15"]["recall"] == 0.0 and au["AU25"]["f1"] == 0.0 and au["AU01"]["support"] == 0
    assert m["au_n"] == 2 and "Action units" in (tmp_path / "rep" / "report.html").read_text()


def test_explain_refuses_the_au_caption_mode(base):
    from cervl.explain.maps import VLMScorer

    model, proc = base
    with pytest.raises(Exception, match="answers with action units first"):
        VLMScorer(Predictor(model, proc, "au-caption", "rafdb-basic"))
