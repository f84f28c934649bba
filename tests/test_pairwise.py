"""The pair-wise baseline: compound probabilities from a basic-emotion model (issue 21, item 3)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cervl.data.prepare import prepare_synthce
from cervl.core.errors import InvalidInput
from cervl.core.labels import components, get_label_set
from cervl.predict.pairwise import compound_from_basic, pair_indices
from helpers import train_quick


@pytest.mark.parametrize("compound", ["rafdb-compound", "cexprdb"])
def test_pairwise_probabilities_sum_to_one_and_equal_brute_force(compound):
    basic, comp = get_label_set("rafdb-basic"), get_label_set(compound)
    probs = np.random.default_rng(0).dirichlet(np.ones(len(basic)), size=50)
    got = compound_from_basic(probs, basic, comp)
    assert got.shape == (50, len(comp)) and np.allclose(got.sum(1), 1.0, atol=1e-12)
    for n in range(50):  # brute force: one class at a time, by name
        joint = {c: probs[n, basic.classes.index(components(c)[0])] * probs[n, basic.classes.index(components(c)[1])]
                 for c in comp.classes}
        total = sum(joint.values())
        assert np.allclose(got[n], [joint[c] / total for c in comp.classes], atol=1e-12)
    # a sure basic pair gives its compound: Happiness 0.5 + Surprise 0.5 -> Happily Surprised
    sure = np.zeros((1, len(basic)))
    sure[0, basic.index_of["Happiness"]] = sure[0, basic.index_of["Surprise"]] = 0.5
    sure[0] += 1e-6
    assert comp.classes[int(compound_from_basic(sure / sure.sum(), basic, comp).argmax())] == "Happily Surprised"


def test_a_basic_set_without_a_component_is_refused():
    with pytest.raises(InvalidInput, match="has no 'Happiness', a component of 'Happily Surprised'"):
        pair_indices(get_label_set("cexprdb"), get_label_set("rafdb-compound"))


def test_predict_compound_from_basic_then_eval(tmp_path):
    base = tmp_path
    prepare_synthce(base / "synthce", base / "m", per_class=2, seed=8)
    run = train_quick(base, base / "m" / "synthce-basic-aligned.jsonl", label_set="rafdb-basic", name="basic")
    compound = base / "m" / "synthce-compound-aligned.jsonl"

    def cervl(*args):
        res = subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    cervl("predict", "--run", run, "--manifest", compound, "-o", base / "pair.jsonl", "--compound-from-basic")
    cervl("predict", "--run", run, "--manifest", compound, "-o", base / "basic.jsonl")
    meta = json.loads((base / "pair.jsonl.meta.json").read_text())
    assert meta["label_set"] == "rafdb-compound" and meta["compound_from_basic"] == "rafdb-basic"
    pair = [json.loads(line) for line in (base / "pair.jsonl").read_text().splitlines()]
    own = [json.loads(line) for line in (base / "basic.jsonl").read_text().splitlines()]
    basic, comp = get_label_set("rafdb-basic"), get_label_set("rafdb-compound")
    expected = compound_from_basic(np.array([[r["probs"][c] for c in basic.classes] for r in own]), basic, comp)
    got = np.array([[r["probs"][c] for c in comp.classes] for r in pair])
    assert len(pair) == 22 and np.allclose(got, expected, atol=2e-6)  # rows carry 6 decimals
    assert [r["pred"] for r in pair] == [comp.classes[i] for i in expected.argmax(1)]
    res = cervl("eval", base / "pair.jsonl", "-o", base / "report")
    assert "accuracy" in res.stdout and (base / "report" / "per_class_accuracy.png").is_file()
