"""Atomic, pickle-free training checkpoints: weights, optimizer, scheduler, RNG and data position.

Everything is stored as safetensors plus JSON, so loading a checkpoint never unpickles. A
checkpoint directory is written under a temporary name and swapped in with renames, so a kill
at any moment leaves either the previous or the new checkpoint complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cervl.core.fsio import swap_in
from cervl.run import CKPT



def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able structure."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random-number states: the CPU generator, and the current GPU's when there is one."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(stage_dir: Path, *, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict, rng: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``stage_dir/checkpoint`` atomically (tmp dir, then rename over the old one).

    ``rng``: every process's :func:`rng_state`, in rank order (default: this process's alone), so that each
    rank of a multi-process run resumes with its own stream.
    """
    final = stage_dir / CKPT
    tmp = stage_dir / f".{CKPT}.tmp"
    old = stage_dir / f".{CKPT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    ranks = rng if rng is not None else [rng_state()]
    save_file({f"rank{r}.{k}": v.contiguous() for r, st in enumerate(ranks) for k, v in st.items()},
              tmp / "rng.safetensors")
    meta = {"state": state, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
    for p in tmp.iterdir():  # make the files durable before the rename makes them visible
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    swap_in(tmp, final, old)
    return final


def _jsonable(x):
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    raise TypeError(f"cannot serialise {type(x).__name__}")


def find_checkpoint(stage_dir: Path) -> Path | None:
    """The complete checkpoint, if any (a kill between the two renames leaves it at ``.old``)."""
    for name in (CKPT, f".{CKPT}.old"):
        p = stage_dir / name
        if (p / "state.json").is_file():
            return p
    return None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and ``rank``'s RNG; return the saved training state."""
    meta = json.loads((path / "state.json").read_text())
    trainable = load_file(path / "trainable.safetensors")
    missing = set(trainable) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters the model lacks: {sorted(missing)[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(tensor)
    optimizer_from_files(optimizer, load_file(path / "optimizer.safetensors"), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    restore_rng(load_file(path / "rng.safetensors"), rank)
    return meta["state"]


def restore_rng(saved: dict[str, torch.Tensor], rank: int) -> None:
    """Set this process's generators from a checkpoint's ``rng.safetensors`` (``rank{r}.*`` keys; checkpoints
    from before per-rank states hold rank 0's ``torch`` and ``cuda{i}`` for every GPU it saw)."""
    mine = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(f"rank{rank}.")}
    if not mine and any(k.startswith("rank") for k in saved):
        raise ValueError(f"the checkpoint holds no random state for process {rank}: it was written by fewer processes")
    if mine:
        torch.set_rng_state(mine["torch"])
        if torch.cuda.is_available() and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"])
        return
    torch.set_rng_state(saved["torch"])  # the older format
    if torch.cuda.is_available():  # as many GPUs as both the save and this machine have (no KeyError)
        saved_gpus = sum(1 for k in saved if k.startswith("cuda"))
        for i in range(min(saved_gpus, torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[f"cuda{i}"], i)
