"""Sharded stages: the staged recipe under FSDP2 with 2 CPU processes (gloo, torchrun) equals 1 process,
and every merge sees full, unsharded weights. DeepSpeed ZeRO-3 with LoRA merges is refused."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import adapter, cervl, manifests, recipe  # noqa: F401 - manifests is a fixture


def _numel(path: Path) -> int:
    return sum(t.numel() for t in load_file(path).values())


def _lora_only(path: Path) -> None:
    """The real-model setting: LoRA only (the tiny quickstart also trains the tied embeddings)."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    for st in cfg["stages"]:
        st["lora"].pop("embeddings", None)
    path.write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
def test_fsdp_two_processes_staged_recipe_equals_one_process(tmp_path, manifests):  # noqa: F811
    common = dict(stages=2, steps=2, dropout=0.0, checkpoint_every=0)
    one = recipe(tmp_path / "one", manifests, batch=4, **common)
    _lora_only(one)
    res = cervl("train", one, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    two = recipe(tmp_path / "two", manifests, batch=2, sharding="fsdp", **common)
    _lora_only(two)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "cervl.cli"]
    res = cervl("train", two, "--no-progress", launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    run1, run2 = tmp_path / "one" / "run", tmp_path / "two" / "run"
    for stage in ("basic", "compound"):  # both stages trained sharded, then merged on gathered weights
        done = json.loads(next((run2 / "stages").glob(f"*-{stage}/DONE.json")).read_text())
        base = _numel(run1 / "final" / "model.safetensors")
        lora = sum(t.numel() for k, t in adapter(run2, stage).items() if "lora_" in k)
        assert done["sharded"] == {"processes": 2, "gathered_parameters": base + lora}
        a, b = adapter(run1, stage), adapter(run2, stage)
        assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # training moved the adapter
        for k in a:
            assert torch.allclose(a[k], b[k], atol=5e-5), (stage, k, (a[k] - b[k]).abs().max())
    w1, w2 = load_file(run1 / "final" / "model.safetensors"), load_file(run2 / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:  # the final merged weights: full shapes, equal to the 1-process run
        assert w1[k].shape == w2[k].shape and torch.allclose(w1[k], w2[k], atol=5e-5), k


def test_fsdp_with_trained_tied_embeddings_is_refused_before_anything_is_written(tmp_path, manifests):  # noqa: F811
    # 19.3: the quickstart recipe (embeddings: full) under sharding=fsdp failed at step 1 on both ranks with
    # "aten._foreach_norm.Scalar got mixed torch.Tensor and DTensor", after the run folder was created
    two = recipe(tmp_path / "two", manifests, batch=2, sharding="fsdp", stages=2, steps=2, checkpoint_every=0)
    import yaml

    assert yaml.safe_load(two.read_text())["stages"][0]["lora"]["embeddings"] == "full"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "cervl.cli"]
    res = cervl("train", two, "--no-progress", launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    # each rank prints the one-line error; two processes writing to one pipe may run the lines together, so
    # the messages are counted, not the lines
    message = "error: stage 0 ('basic') trains the token embeddings"
    assert res.stderr.count(message) == 2 and "stages.0.lora.embeddings=frozen" in res.stderr, res.stderr[-3000:]
    assert "DTensor" not in res.stderr and not (tmp_path / "two" / "run").exists()


def test_zero3_with_lora_merges_is_refused(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cervl.core.errors import UserError
    from cervl.train.sharding import refuse_unmergeable

    cfg = SimpleNamespace(stages=[SimpleNamespace(method="lora"), SimpleNamespace(method="lora")])

    class State:
        deepspeed_plugin = type("Plugin", (), {"zero_stage": 3})()

    class Acc:
        distributed_type, state = DistributedType.DEEPSPEED, State()

    with pytest.raises(UserError, match="ZeRO-3"):
        refuse_unmergeable(cfg, Acc())
    Acc.state.deepspeed_plugin.zero_stage = 2
    refuse_unmergeable(cfg, Acc())  # ZeRO-2 keeps whole weights on every process: allowed


def test_deepspeed_requested_on_cpu_is_refused_not_ignored(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cervl.core.errors import UserError
    from cervl.train.sharding import refuse_unmergeable

    cfg = SimpleNamespace(stages=[SimpleNamespace(method="lora")])
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, state=SimpleNamespace(deepspeed_plugin=None))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    with pytest.raises(UserError, match="GPUs only"):
        refuse_unmergeable(cfg, acc)
