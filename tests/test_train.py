"""Staged training through the real CLI: resume after SIGKILL, 2 processes, families, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cervl.data.prepare import prepare_synthce as _prepare_synth
from cervl.train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    _prepare_synth(base / "synthce", base / "m", per_class=4, seed=5, val_fraction=0.25)
    return base / "m"


def recipe(tmp_path, manifests, *, stages=2, model="tiny-qwen2-vl", steps=4, dropout=0.05, batch=4, **top):
    st = [{"name": "basic", "data": [{"manifest": str(manifests / "synthce-basic-aligned.jsonl")}],
           "label_set": "rafdb-basic", "prompt": "minimal",
           "lora": {"rank": 16, "alpha": 32, "dropout": dropout, "embeddings": "full"}, "max_steps": steps, "lr": 1e-3,
           "batch_size": batch},
          {"name": "compound", "data": [{"manifest": str(manifests / "synthce-compound-aligned.jsonl")}],
           "label_set": "rafdb-compound", "prompt": "minimal",
           "lora": {"rank": 8, "alpha": 16, "dropout": dropout}, "max_steps": steps, "lr": 1e-3,
           "batch_size": batch}][-stages:]
    cfg = {"model": {"name": model}, "output_dir": str(tmp_path / "run"), "checkpoint_every": 2, "log_every": 1,
           "stages": st, "test": {"manifest": str(manifests / "synthce-compound-aligned.jsonl"), "splits": ["test"],
                                  "max_samples": 8}}
    cfg.update(top)
    path = tmp_path / "recipe.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def cervl(*args, env=None, launcher=None):
    cmd = (launcher or [sys.executable, "-m", "cervl.cli"]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def adapter(run, stage):
    return load_file(next((Path(run) / "stages").glob(f"*-{stage}")) / "adapter" / "adapter_model.safetensors")


def test_two_stage_run_records_lineage_and_reloads(tmp_path, manifests):
    cfg = recipe(tmp_path, manifests)
    res = cervl("train", cfg, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert "test accuracy (rafdb-compound, 8 samples)" in res.stdout and f"run directory: {run}" in res.stdout
    import json

    lineage = json.loads((run / "lineage.json").read_text())
    assert [(e["stage"], e["kind"], e.get("rank")) for e in lineage] == [
        ("base", "base", None), ("basic", "lora", 16), ("compound", "lora", 8)]
    meta = json.loads((run / "final" / "cervl.json").read_text())
    assert meta["prompt"] == "minimal" and meta["label_set"] == "rafdb-compound"
    assert (run / "config.json").is_file() and (run / "stages" / "00-basic" / "metrics.csv").is_file()
    # a fresh process reloads the final model with its prompt and label set and scores like the run did
    from cervl.evaluate.evaluation import evaluate
    from cervl.run import load_run

    model, proc, meta = load_run(run)
    ev = evaluate(model, proc, meta.style, meta.labels, str(manifests / "synthce-compound-aligned.jsonl"), ["test"],
                  max_samples=8)
    saved = json.loads((run / "test_metrics.json").read_text())
    assert ev["confusion"] == saved["confusion"]
    # rerunning the finished recipe retrains nothing
    again = cervl("train", cfg, "--no-progress")
    assert again.returncode == 0 and "already finished" in again.stderr


def test_resume_after_kill_matches_uninterrupted(tmp_path, manifests):
    full = recipe(tmp_path / "a", manifests, stages=1, steps=6)
    assert cervl("train", full, "--no-progress").returncode == 0
    killed = recipe(tmp_path / "b", manifests, stages=1, steps=6)
    res = cervl("train", killed, "--no-progress", env={"CERVL_CRASH_AT": "checkpoint:4"})
    assert res.returncode == -9  # SIGKILL, as kill -9
    state = json.loads((tmp_path / "b" / "run" / "stages" / "00-compound" / "checkpoint" / "state.json").read_text())
    assert state["state"] == {"step": 4, "total_steps": 6, "prompt": "minimal", "label_set": "rafdb-compound"}
    assert not (tmp_path / "b" / "run" / "stages" / "00-compound" / "DONE.json").exists()
    res = cervl("train", killed, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "at step 4/6" in res.stderr
    a, b = adapter(tmp_path / "a" / "run", "compound"), adapter(tmp_path / "b" / "run", "compound")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cervl.cli"]


@pytest.mark.slow
def test_two_process_resume_after_kill_is_bit_identical(tmp_path, manifests):
    # 19.7: checkpoints held rank 0's RNG only and every rank restored it; each rank now has its own stream
    # (dropout 0.05 draws different masks on the two ranks), saved and restored per rank
    env = {"OMP_NUM_THREADS": "1"}
    full = recipe(tmp_path / "a", manifests, stages=1, steps=6, batch=2)
    res = cervl("train", full, "--no-progress", launcher=TORCHRUN, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    killed = recipe(tmp_path / "b", manifests, stages=1, steps=6, batch=2)
    res = cervl("train", killed, "--no-progress", launcher=TORCHRUN, env={**env, "CERVL_CRASH_AT": "checkpoint:4"})
    assert res.returncode != 0
    ckpt = tmp_path / "b" / "run" / "stages" / "00-compound" / "checkpoint"
    rng = load_file(ckpt / "rng.safetensors")
    assert sorted(rng) == ["rank0.torch", "rank1.torch"] and not torch.equal(rng["rank0.torch"], rng["rank1.torch"])
    res = cervl("train", killed, "--no-progress", launcher=TORCHRUN, env=env)
    assert res.returncode == 0 and "at step 4/6" in res.stderr, res.stderr[-3000:]
    a, b = adapter(tmp_path / "a" / "run", "compound"), adapter(tmp_path / "b" / "run", "compound")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_match_one_process_with_same_global_batch(tmp_path, manifests):
    one = recipe(tmp_path / "one", manifests, stages=1, steps=3, dropout=0.0, batch=4)
    assert cervl("train", one, "--no-progress").returncode == 0
    two = recipe(tmp_path / "two", manifests, stages=1, steps=3, dropout=0.0, batch=2)
    # torchrun is the launcher `accelerate launch --multi_gpu` uses; on CPU, `accelerate launch --cpu`
    # starts a single process unless mpirun is available, so the gloo test calls torchrun directly.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "cervl.cli"]
    res = cervl("train", two, "--no-progress", launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = adapter(tmp_path / "one" / "run", "compound"), adapter(tmp_path / "two" / "run", "compound")
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-4  # training changed the adapter
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_end_to_end_other_families(tmp_path, manifests, family):
    res = cervl("train", recipe(tmp_path, manifests, stages=1, steps=2, model=family), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "test accuracy" in res.stdout


def test_real_tokenizer_run(tmp_path, manifests, shared_dir):
    cfg = recipe(tmp_path, manifests, stages=1, steps=2)
    res = cervl("train", cfg, "--no-progress", f"model.tokenizer={shared_dir / 'qwen2-vl-tokenizer'}",
                "model.name=tiny-qwen2-vl")
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "run" / "base").text_config.vocab_size >= 151657


@pytest.mark.parametrize("override, message", [
    ("stages.0.data.0.manifest=/nope/m.jsonl", "manifest not found: /nope/m.jsonl"),
    ("stages.0.data.0.splits=[val2]", "no records in split(s) ['val2']"),
    ("stages.0.label_set=cexprdb", "which is not in the stage's label set 'cexprdb'"),
    ("stages.0.lerning_rate=1", "unknown key 'stages[0].lerning_rate'"),
    ("stages.0.lora.rnak=4", "did you mean 'rank'?"),
    ("stages.0.method=qlora", "'method' must be one of ('lora', 'full')"),
])
def test_bad_input_fails_early_with_specific_message(tmp_path, manifests, override, message):
    res = cervl("train", recipe(tmp_path, manifests, stages=1), override)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run" / "base").exists()  # failed before building anything


def test_every_shipped_config_parses():
    from cervl.experiments.ablate import cells, load_ablation

    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 6
    for p in paths:
        header = "\n".join(line for line in p.read_text().splitlines() if line.startswith("#"))
        assert "# Run: " in header, f"{p} does not state the command that runs it"
        if p.name.startswith("ablation"):
            grid, axes = load_ablation(p)
            expect = (math.prod(len(v) for v in axes.values()) if grid.mode == "product"
                      else 1 + sum(len(v) - 1 for v in axes.values()))
            assert len(cells(grid, axes)) == expect
            for variants in axes.values():  # every variant's overrides apply to the base recipe
                for v in variants.values():
                    assert load_config(grid.base, v.overrides).stages
        else:
            assert load_config(p).stages
    paper = load_config(ROOT / "configs" / "paper-qwen2vl-7b.yaml")
    assert [(s.lora.rank, s.epochs, s.prompt) for s in paper.stages] == [(16, 20, "context"), (8, 10, "context")]
    for p in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        text = p.read_text()
        assert "accelerate launch" in text and yaml.safe_load(text)["num_processes"] >= 2


def test_override_parsing_and_errors(tmp_path):
    p = ROOT / "configs" / "quickstart.yaml"
    cfg = load_config(p, ["stages.1.lr=5e-5", "output_dir=/tmp/x", "stages.0.lora.rank=4"])
    assert cfg.stages[1].lr == 5e-5 and cfg.output_dir == "/tmp/x" and cfg.stages[0].lora.rank == 4
    with pytest.raises(ConfigError, match="not an index"):
        load_config(p, ["stages.7.lr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["stages"])


def test_adapter_save_mode_reloads_by_merging_the_lineage(tmp_path, manifests):
    res = cervl("train", recipe(tmp_path, manifests, stages=2, steps=2), "--no-progress", "save=adapter")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "final" / "model.safetensors").exists()  # only cervl.json: the lineage is the model
    from cervl.evaluate.evaluation import evaluate
    from cervl.run import load_run

    model, proc, meta = load_run(run)
    assert meta.save == "adapter"
    ev = evaluate(model, proc, meta.style, meta.labels, str(manifests / "synthce-compound-aligned.jsonl"), ["test"],
                  max_samples=8)
    assert ev["confusion"] == json.loads((run / "test_metrics.json").read_text())["confusion"]


def test_prefetch_thread_and_worker_processes_give_the_same_adapter(tmp_path, manifests):
    runs = {}
    for name, flags in (("inline", ["prefetch=false"]), ("thread", ["prefetch=true"]), ("workers", ["num_workers=2"])):
        cfg = recipe(tmp_path / name, manifests, stages=1, steps=4)
        res = cervl("train", cfg, "--no-progress", *flags)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = adapter(tmp_path / name / "run", "compound")
    for name in ("thread", "workers"):
        for k in runs["inline"]:
            assert torch.equal(runs["inline"][k], runs[name][k]), (name, k)


def test_length_grouped_batches_are_deterministic_and_sorted(tmp_path):
    from cervl.data.manifest import Record
    from cervl.data.mixture import Mixture, Sample

    samples = [Sample(Record(image=f"{i}.jpg", label="Fear", label_set="rafdb-basic", split="train",
                             dataset="x"), Path(f"/{i}.jpg")) for i in range(40)]
    size = {s.path: (7 * i) % 13 for i, s in enumerate(samples)}  # 13 distinct "image areas"
    a = Mixture([(samples, 1.0)], seed=3, group=8, length=lambda s: size[s.path])
    b = Mixture([(samples, 1.0)], seed=3, group=8, length=lambda s: size[s.path])
    order = a.take(0, 80)
    assert order == b.take(0, 80) and a.take(30, 10) == order[30:40]  # a resumed stream is the same stream
    for start in range(0, 80, 8):
        group = [size[s.path] for s in order[start:start + 8]]
        assert group == sorted(group, reverse=True)
    assert sorted(s.path for s in order[:40]) == sorted(s.path for s in samples)  # still every sample once
    plain = Mixture([(samples, 1.0)], seed=3).take(0, 40)
    assert sorted(s.path for s in plain) == sorted(s.path for s in order[:40]) and plain != order[:40]
