"""Metrics against hand-computed values, the parser (incl. fuzzing), reports and the ABAW writer."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from cervl.core.labels import COMPOUND, get_label_set
from cervl.evaluate.metrics import (abaw_cer_score, accuracy, confusion_matrix, invalid_rate, macro_f1, per_class_accuracy,
                           per_class_f1, reliability, row_normalize, summarize, top_k_accuracy, weighted_f1)
from cervl.predict import parse_answer
from cervl.evaluate.abaw import ABAW_HEADER, write_abaw_submission
from cervl.evaluate.report import write_comparison, write_report


# Hand-worked example, 3 classes:
#   true: 0 0 0 1 1 2 2 2 2 2      pred: 0 0 1 1 -1 2 2 0 2 1
Y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
P = np.array([0, 0, 1, 1, -1, 2, 2, 0, 2, 1])


def test_metrics_hand_computed():
    assert accuracy(Y, P) == 0.6
    assert confusion_matrix(Y, P, 3).tolist() == [[2, 1, 0], [0, 1, 0], [1, 1, 3]]
    support = np.bincount(Y, minlength=3)
    assert np.allclose(row_normalize(confusion_matrix(Y, P, 3), support)[1], [0, 0.5, 0])  # invalid counts in support
    assert summarize(Y, P, 3)["confusion_normalized"][1] == [0.0, 0.5, 0.0]
    assert np.allclose(per_class_accuracy(Y, P, 3), [2 / 3, 1 / 2, 3 / 5])
    # class 0: tp 2, support 3, predicted 3 -> F1 2/3; class 1: tp 1, support 2, predicted 3 -> 2/5;
    # class 2: tp 3, support 5, predicted 3 -> 6/8
    assert np.allclose(per_class_f1(Y, P, 3), [2 / 3, 0.4, 0.75])
    assert macro_f1(Y, P, 3) == pytest.approx((2 / 3 + 0.4 + 0.75) / 3)
    assert weighted_f1(Y, P, 3) == pytest.approx((3 * 2 / 3 + 2 * 0.4 + 5 * 0.75) / 10)
    assert invalid_rate(P) == 0.1


def test_row_normalize_without_support_uses_row_sums():
    c = confusion_matrix(Y, P, 3)
    assert row_normalize(c)[1].tolist() == [0.0, 1.0, 0.0]


def test_top2_confidence_and_reliability():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    y = np.array([0, 1, 1, 0])
    assert top_k_accuracy(y, probs, 2) == 0.75
    rel = reliability(y, probs, bins=2)  # bins [0, .5) and [.5, 1]
    assert rel["count"] == [0, 4]
    assert rel["accuracy"][1] == 0.25 and rel["confidence"][1] == pytest.approx(0.6)
    assert rel["ece"] == pytest.approx(0.35)


def test_abaw_metric_is_mean_f1_over_7():
    y = np.arange(7).repeat(2)
    assert abaw_cer_score(y, y) == 1.0
    p = y.copy()
    p[0] = 1  # one Fearfully Surprised frame called Happily Surprised
    f1 = per_class_f1(y, p, 7)
    assert f1[0] == pytest.approx(2 / 3) and f1[1] == pytest.approx(0.8)
    assert abaw_cer_score(y, p) == pytest.approx((2 / 3 + 0.8 + 5) / 7)


@pytest.mark.parametrize("text, expected", [
    ("Happily Surprised", "Happily Surprised"),
    ("happily-surprised", "Happily Surprised"),
    ("HAPPILY_SURPRISED", "Happily Surprised"),
    ("The expression is Sadly Angry.", "Sadly Angry"),
    ("**Sadly Fearful**", "Sadly Fearful"),
    ("_Angrily Disgusted_", "Angrily Disgusted"),
    ('{"expression": "Fearfully Surprised"}', "Fearfully Surprised"),
    ('```json\n{"label": "sadly_surprised"}\n```', "Sadly Surprised"),
    ("I would say this person looks disgustedly surprised overall.", "Disgustedly Surprised"),
    ("Sadly Angry or Sadly Fearful", None),
    ("happy", None),
    ("", None),
    ("no idea", None),
])
def test_parser_cases(text, expected):
    assert parse_answer(text, "rafdb-compound") == expected


def test_parser_basic_set_and_foreign_compound():
    assert parse_answer("She is happy.", "rafdb-basic") == "Happiness"
    assert parse_answer("Happily Surprised", "rafdb-basic") is None  # names a class the set lacks
    assert parse_answer("Happily Disgusted", "cexprdb") is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.sampled_from(COMPOUND).map(lambda c: f"x {c.lower()} y"))
def test_parser_fuzz_never_raises_and_returns_class_or_none(text):
    out = parse_answer(text, "rafdb-compound")
    assert out is None or out in get_label_set("rafdb-compound")


def test_report_files_and_pngs(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(3), 10)
    m = summarize(Y, P, 3, probs)
    html = write_report(tmp_path / "r", m, ["A", "B", "C"], title="t")
    for name in ("metrics.json", "report.md", "report.html", "confusion_matrix.png", "per_class_accuracy.png",
                 "reliability.png"):
        assert (tmp_path / "r" / name).is_file(), name
    for png in (tmp_path / "r").glob("*.png"):
        with Image.open(png) as im:
            im.verify()
            assert im.size[0] > 200
    assert "data:image/png;base64," in html.read_text()
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["accuracy"] == 0.6
    m2 = summarize(Y, Y, 3, probs)
    write_report(tmp_path / "r2", m2, ["A", "B", "C"])
    md = write_comparison([tmp_path / "r", tmp_path / "r2"], tmp_path / "cmp", ["aligned", "original"]).read_text()
    assert "| accuracy | 0.6000 | 1.0000 | +0.4000 |" in md
    assert "| B | 0.5000 | 1.0000 | +0.5000 |" in md


def test_abaw_writer_exact_format(tmp_path):
    rows = [{"video": "vid2", "frame": 3, "pred": "Sadly Angry"},
            {"video": "vid1", "frame": 12, "pred": "Fearfully Surprised"},
            {"video": "vid1", "frame": 2, "pred": "Happily Surprised"}]
    path = write_abaw_submission(rows, tmp_path / "sub.txt")
    assert path.read_text() == (ABAW_HEADER + "\n" "vid1/00002.jpg,1\n" "vid1/00012.jpg,0\n" "vid2/00003.jpg,6\n")
    assert ABAW_HEADER == ("image_location,Fearfully_Surprised,Happily_Surprised,Sadly_Surprised,"
                           "Disgustedly_Surprised,Angrily_Surprised,Sadly_Fearful,Sadly_Angry")
    with pytest.raises(ValueError, match="not a C-EXPR-DB class"):
        write_abaw_submission([{"video": "v", "frame": 1, "pred": "Happily Disgusted"}], tmp_path / "x.txt")
