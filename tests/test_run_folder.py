"""The run folder (cervl.run): relative paths, moved runs, older runs, one way to apply a stage."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cervl.data.prepare import prepare_synthce


def cervl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-stage run saved as adapters (stage 1 trains the embeddings too), one 1-stage merged run."""
    base = tmp_path_factory.mktemp("runs")
    prepare_synthce(base / "synthce", base / "m", per_class=3, seed=4, val_fraction=0.0)
    m = base / "m"
    stage = lambda name, subset, rank: {  # noqa: E731
        "name": name, "data": [{"manifest": str(m / f"synthce-{subset}-aligned.jsonl")}],
        "label_set": f"rafdb-{subset}", "prompt": "minimal", "max_steps": 2, "batch_size": 4, "lr": 5e-3,
        "lora": {"rank": rank, "alpha": 2 * rank, "embeddings": "full"}}
    for name, stages, save in (("adapter", [stage("basic", "basic", 8), stage("compound", "compound", 4)], "adapter"),
                               ("merged", [stage("compound", "compound", 4)], "merged")):
        cfg = {"model": {"name": "tiny-qwen2-vl"}, "output_dir": str(base / name), "checkpoint_every": 0,
               "save": save, "stages": stages}
        (base / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        res = cervl("train", base / f"{name}.yaml", "--no-progress")
        assert res.returncode == 0, res.stderr[-3000:]
    return base


def _probs(path):
    return np.array([[r["probs"][c] for c in sorted(r["probs"])] for r in map(json.loads, Path(path).open())])


def test_lineage_paths_are_relative_to_the_run(runs):
    lineage = json.loads((runs / "adapter" / "lineage.json").read_text())
    assert lineage[0]["weights"] == "base"
    assert [e["adapter"] for e in lineage[1:]] == ["stages/00-basic/adapter", "stages/01-compound/adapter"]
    assert json.loads((runs / "adapter" / "cervl-run.json").read_text())["format"] == "cervl-run"


def test_moved_run_reloads_and_predicts_identically(runs, tmp_path):
    manifest = runs / "m" / "synthce-compound-aligned.jsonl"
    res = cervl("predict", "--run", runs / "adapter", "--manifest", manifest, "-o", tmp_path / "before.jsonl")
    assert res.returncode == 0, res.stderr[-2000:]
    moved = tmp_path / "elsewhere" / "copied-run"
    shutil.copytree(runs / "adapter", moved)
    hidden = runs / "adapter.hidden"
    (runs / "adapter").rename(hidden)  # nothing may still point at the original folder
    try:
        res = cervl("predict", "--run", moved, "--manifest", manifest, "-o", tmp_path / "after.jsonl", cwd="/")
    finally:
        hidden.rename(runs / "adapter")
    assert res.returncode == 0, res.stderr[-2000:]
    before, after = _probs(tmp_path / "before.jsonl"), _probs(tmp_path / "after.jsonl")
    assert before.shape == (33, 11) and np.array_equal(before, after)


def test_older_run_folder_with_absolute_and_cwd_relative_paths_loads(runs, tmp_path):
    from cervl.predict import Predictor

    old = tmp_path / "old-run"
    shutil.copytree(runs / "adapter", old)
    meta_path = old / "final" / "cervl.json"
    meta = json.loads(meta_path.read_text())
    # the format before cervl.run: absolute base weights, adapters relative to where training started
    meta["lineage"][0]["weights"] = "/somewhere/that/moved/run/base"
    for e in meta["lineage"][1:]:
        e["adapter"] = f"runs/demo/run/{e['adapter']}"
    meta.pop("format")
    meta_path.write_text(json.dumps(meta))
    images = sorted((runs / "synthce" / "compound" / "Image" / "aligned").glob("*.jpg"))[:4]
    a = Predictor.from_run(old).score(images)
    b = Predictor.from_run(runs / "adapter").score(images)
    np.testing.assert_array_equal(a, b)


def test_from_adapter_applies_the_trained_embeddings_and_equals_final(runs, tmp_path):
    from cervl.predict import Predictor

    run = runs / "merged"
    images = sorted((runs / "synthce" / "compound" / "Image" / "aligned").glob("*.jpg"))[:6]
    merged = Predictor.from_run(run).score(images)
    adapter = Predictor.from_adapter(str(run / "base"), str(run / "stages" / "00-compound" / "adapter"),
                                     prompt="minimal", label_set="rafdb-compound", dtype="fp32").score(images)
    np.testing.assert_allclose(adapter, merged, atol=1e-6)
    # without the trained embeddings (what from_adapter did before) the model is a different one
    lora_only = tmp_path / "adapter"
    shutil.copytree(run / "stages" / "00-compound" / "adapter", lora_only)
    (lora_only / "extra_trainables.safetensors").unlink()
    without = Predictor.from_adapter(str(run / "base"), str(lora_only), prompt="minimal", label_set="rafdb-compound",
                                     dtype="fp32").score(images)
    assert np.abs(without - merged).max() > 1e-3


def test_final_replacement_refuses_foreign_files(runs, tmp_path):
    from cervl.core.errors import InvalidInput
    from cervl.run import RunMeta, save_final

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="did not write"):
        save_final(None, None, RunMeta("minimal", "rafdb-compound", [], save="adapter"), tmp_path)
    assert (tmp_path / "final" / "notes.txt").read_text() == "mine"


def test_keyerror_inside_a_detector_constructor_surfaces_as_itself(monkeypatch):
    from cervl.core.errors import UnknownName
    from cervl.faces import detect

    class Broken(detect.FaceDetector):
        name = "broken"

        def __init__(self, **options):
            raise KeyError("a bug inside the detector")

    monkeypatch.setitem(detect.DETECTORS, "broken", Broken)
    with pytest.raises(KeyError) as err:
        detect.make_detector("broken")
    assert not isinstance(err.value, UnknownName) and err.value.args == ("a bug inside the detector",)
    with pytest.raises(UnknownName, match="did you mean 'broken'"):
        detect.make_detector("brokn")


def test_cli_prints_user_errors_and_keeps_tracebacks_of_bugs(monkeypatch, capsys):
    from cervl import cli
    from cervl.core.errors import InvalidInput

    def user_error(args):
        raise InvalidInput("config.yaml: 'lr' must be a finite number > 0")

    def bug(args):
        raise KeyError("oops")

    monkeypatch.setitem(cli.COMMANDS, "labels", user_error)
    assert cli.main(["labels"]) == 2
    assert capsys.readouterr().err.strip() == "error: config.yaml: 'lr' must be a finite number > 0"
    monkeypatch.setitem(cli.COMMANDS, "labels", bug)
    with pytest.raises(KeyError, match="oops"):
        cli.main(["labels"])


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_loading_never_writes_the_run_folder(runs, tmp_path):
    # 19.5: load_run renamed .final.old back to final; a save in progress then lost its new weights, two
    # actors recovering at once failed, and a read-only shared folder failed
    from cervl.predict import Predictor
    from cervl.run import RunLock, RunMeta, load_run, save_final

    run = tmp_path / "merged"
    shutil.copytree(runs / "merged", run)
    reference = Predictor.from_run(run).score([Image.new("RGB", (112, 112), (128, 100, 90))])
    (run / "final").rename(run / ".final.old")  # a save killed between its two renames
    before = _snapshot(run)
    model, processor, meta = load_run(run)
    assert _snapshot(run) == before and not (run / "final").exists()  # read from .final.old, nothing moved
    got = Predictor(model, processor, meta.style, meta.labels).score([Image.new("RGB", (112, 112), (128, 100, 90))])
    assert np.array_equal(got, reference)
    with RunLock(run):  # recovery belongs to the lock holder: the trainer's save puts a complete final/ back
        save_final(model, processor, RunMeta.read(run), run)
    assert (run / "final" / "cervl.json").is_file() and not (run / ".final.old").exists()


def test_stage_validation_and_the_test_report_give_the_same_numbers(runs, tmp_path):
    # issue 20: validation scored with score_labels, the test report through Predictor.predict
    from cervl.evaluate.evaluation import evaluate, test_report
    from cervl.predict import Predictor

    pred = Predictor.from_run(runs / "merged")
    manifest = runs / "m" / "synthce-compound-aligned.jsonl"
    ev = evaluate(pred.model, pred.processor, pred.style, pred.label_set, str(manifest), ["train"])
    rep = test_report(pred, str(manifest), ["train"], tmp_path / "eval", progress=False)
    assert ev["n"] == rep["n"] == 22 and ev["accuracy"] == rep["accuracy"] and ev["macro_f1"] == rep["macro_f1"]
    assert ev["confusion"] == [list(r) for r in rep["confusion"]]
