"""The run folder: its format, its ownership, and how a trained model is rebuilt from it.

A run folder written by ``cervl train``::

    RUN/
      cervl-run.json        marker: this folder is a cervl run (cervl deletes only inside such folders)
      config.json           the resolved recipe
      lineage.json          which stage produced which weights (paths relative to RUN)
      base/                 tiny presets only: the random-init base, saved so resume is exact
      stages/NN-name/       adapter/ or weights/, metrics.csv, stage.json, DONE.json, checkpoint/
      final/                merged safetensors + tokenizer + processor + cervl.json (RunMeta)
      eval/                 test predictions and report

Every path that points inside the run folder is stored relative to it, so a run folder can be moved
or copied to another machine (with the same base model id) and reloads identically. Run folders
written before this format (absolute or working-directory-relative paths) still load: their paths
are re-rooted at the ``stages/`` or ``base`` component.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cervl.errors import InputNotFound, InvalidInput, UserError
from cervl.labels import LabelSet, get_label_set
from cervl.models import TINY_BASE, TINY_PRESETS, default_attn_implementation, load_model, merge_lora, save_model
from cervl.prompts import PromptStyle, get_prompt_style

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MARKER = "cervl-run.json"
RUN_META = "cervl.json"
EXTRA = "extra_trainables.safetensors"  # non-LoRA weights a LoRA stage trained (embeddings, full vision...)


# ----------------------------------------------------------------------------------------------
# Paths inside a run folder
# ----------------------------------------------------------------------------------------------

def relative(run_dir: Path, path: str | os.PathLike) -> str:
    """``path`` relative to ``run_dir`` when it lies inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def resolve(run_dir: Path, stored: str) -> Path:
    """A stored path as a real path: relative ones against ``run_dir``; older runs' paths re-rooted."""
    p = Path(stored)
    if not p.is_absolute():
        inside = Path(run_dir) / p
        if inside.exists():
            return inside
    elif p.exists():
        return p
    # Older run folders stored absolute or cwd-relative paths: re-root them at their run-folder part.
    for anchor in ("stages", "base"):
        if anchor in p.parts:
            candidate = Path(run_dir).joinpath(*p.parts[p.parts.index(anchor):])
            if candidate.exists():
                return candidate
    return Path(run_dir) / p if not p.is_absolute() else p


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return Path(run_dir) / "stages" / f"{index:02d}-{name}"


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------

@dataclass
class RunMeta:
    """``final/cervl.json``: what a predictor needs besides the weights."""

    prompt: str
    label_set: str
    lineage: list[dict]
    save: str = "merged"  # merged | adapter
    max_length: int = 2048
    model: dict = field(default_factory=dict)
    format: int = FORMAT_VERSION

    @property
    def style(self) -> PromptStyle:
        return get_prompt_style(self.prompt)

    @property
    def labels(self) -> LabelSet:
        return get_label_set(self.label_set)

    @classmethod
    def read(cls, run_dir: Path) -> "RunMeta":
        path = Path(run_dir) / "final" / RUN_META
        if not Path(run_dir).is_dir():
            demo = Path(run_dir).as_posix().rstrip("/").endswith("runs/demo/run")
            raise InputNotFound(f"run folder not found: {run_dir}" + (" (`make demo` creates it)" if demo else ""))
        if not path.is_file():
            raise InputNotFound(f"{run_dir} has no final/{RUN_META}: is it a finished cervl run?")
        data = json.loads(path.read_text())
        known = {k: data[k] for k in ("prompt", "label_set", "lineage", "save", "max_length", "model", "format")
                 if k in data}
        if known.get("format", 1) > FORMAT_VERSION:
            raise InvalidInput(f"{path}: run format {known['format']} is newer than this cervl reads "
                               f"({FORMAT_VERSION}); upgrade cervl")
        try:
            return cls(**known)
        except TypeError as e:
            raise InvalidInput(f"{path}: not a cervl run description ({e})") from None


def write_json(path: Path, data) -> None:
    from cervl.data.manifest import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# Ownership and locking
# ----------------------------------------------------------------------------------------------

def is_run(run_dir: Path) -> bool:
    """A folder cervl wrote as a run (marker, or a config.json of a run from before the marker)."""
    run_dir = Path(run_dir)
    if (run_dir / MARKER).is_file():
        return True
    return (run_dir / "config.json").is_file() and (run_dir / "stages").is_dir()


def claim_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` a cervl run folder; refuse a non-empty folder that is not one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InvalidInput(f"output_dir {run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run(run_dir):
        raise InvalidInput(f"output_dir {run_dir} is not empty and is not a cervl run folder (no {MARKER}); "
                           f"cervl writes and replaces files there, so choose an empty or new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MARKER).is_file():
        write_json(run_dir / MARKER, {"format": "cervl-run", "version": FORMAT_VERSION,
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def has_progress(run_dir: Path) -> bool:
    """True once any stage has finished or checkpointed (work that a different recipe would corrupt)."""
    stages = Path(run_dir) / "stages"
    return stages.is_dir() and any((d / "DONE.json").is_file() or (d / "checkpoint").is_dir()
                                   or (d / ".checkpoint.old").is_dir() for d in stages.iterdir())


def check_config(run_dir: Path, config: dict) -> None:
    """Refuse to resume a run folder with a different model or stages; then write ``config.json``.

    A folder where no stage finished or checkpointed (a failed start) is simply reused.
    """
    saved = Path(run_dir) / "config.json"
    if saved.is_file():
        previous = json.loads(saved.read_text())
        current = json.loads(json.dumps(config, default=str))
        if previous.get("stages") != current["stages"] or previous.get("model") != current["model"]:
            if has_progress(run_dir):
                raise InvalidInput(f"{run_dir} holds a run with a different model or stages; choose another "
                                   f"output_dir (override: output_dir=...), or delete that run folder")
            log.warning("%s: replacing the config of a run that never finished or checkpointed a stage", run_dir)
            if previous.get("model") != current["model"]:
                shutil.rmtree(Path(run_dir) / "base", ignore_errors=True)  # a tiny base cervl built for the old model
    write_json(saved, config)


class RunLock:
    """``RUN/.lock`` holding the trainer's pid and host; a second trainer on the same folder fails at once.

    A lock whose process is dead (same host) is stale, and is taken over with a warning.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def __enter__(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise UserError(f"cannot lock {self.path.parent}")

    def _check_stale(self) -> None:
        try:
            other = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            other = {}
        pid, host = other.get("pid"), other.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            log.warning("taking over the stale lock of %s (process %d on %s is gone)", self.path.parent, pid, host)
            self.path.unlink(missing_ok=True)
            return
        if not other:  # unreadable: a trainer is writing it right now, or it is damaged
            raise UserError(f"{self.path} exists and is unreadable; if no cervl train runs on this folder, delete it")
        raise UserError(f"{self.path.parent} is in use by cervl train (pid {pid} on {host}, since "
                        f"{other.get('since')}); wait for it, or choose another output_dir")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Base weights, stages, final model
# ----------------------------------------------------------------------------------------------

def base_entry(spec_name: str, run_dir: Path) -> dict:
    """The lineage entry of a run's starting weights."""
    if spec_name in TINY_PRESETS:
        weights = "base"  # built once and saved in the run, so resume and reload are exact
    elif spec_name == "pretrained-tiny":
        weights = "pretrained-tiny"  # shipped inside the package, wherever it is installed
    else:
        local = Path(spec_name)
        weights = relative(run_dir, local) if local.exists() else spec_name  # a folder, or a hub id
    return {"stage": "base", "kind": "base", "source": spec_name, "weights": weights}


def base_weights(entry: dict, run_dir: Path) -> Path | str:
    """Where a base entry's weights are: the package's tiny base, a folder, or a hub id."""
    if entry.get("source") == "pretrained-tiny":
        if not (TINY_BASE / "model.safetensors").is_file():
            raise InputNotFound(f"the shipped tiny base is missing at {TINY_BASE}; rebuild it with `cervl pretrain-tiny`")
        return TINY_BASE
    stored = entry["weights"]
    path = resolve(run_dir, stored)
    return path if path.exists() else stored


def apply_stage(model, entry: dict, run_dir: Path | None = None):
    """Bring ``model`` to the state right after the stage of ``entry`` (a lineage entry).

    LoRA stages: load the adapter, merge it, then copy the non-LoRA weights the stage trained
    (``extra_trainables.safetensors``: e.g. embeddings with ``lora.embeddings: full``). Full stages:
    load the stage's weights. This is the one place a stage's output is applied, for resume, for
    ``save: adapter`` runs and for :meth:`cervl.predict.Predictor.from_adapter`.
    """
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_safetensors

    root = Path(run_dir) if run_dir is not None else Path(".")
    if entry["kind"] == "lora":
        from peft import PeftModel

        adapter = resolve(root, entry["adapter"])
        if not (adapter / "adapter_model.safetensors").is_file():
            found = sorted(p.name for p in adapter.iterdir()) if adapter.is_dir() else "no such folder"
            raise InvalidInput(f"{adapter}: no adapter_model.safetensors ({found}); cervl loads safetensors "
                               f"adapters only, never pickled .bin files")
        model = merge_lora(PeftModel.from_pretrained(model, adapter))
        extra = adapter / EXTRA
        if extra.is_file():
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in load_file(extra).items():
                    if name not in params:
                        raise InvalidInput(f"{extra}: parameter {name} is not in the model")
                    params[name].copy_(tensor)
        return model
    if entry["kind"] == "full":
        load_safetensors(model, str(resolve(root, entry["weights"]) / "model.safetensors"))
        return model
    raise InvalidInput(f"lineage entry of stage {entry.get('stage')!r} has unknown kind {entry.get('kind')!r}")


def save_final(model, processor, meta: RunMeta, run_dir: Path) -> Path:
    """``final/``: merged weights + processor files + cervl.json, or (``save: adapter``) cervl.json alone.

    The new folder is written complete under a temporary name and swapped in by renames, so a kill
    at any moment leaves a complete ``final/`` (or, between the renames, ``.final.old``).
    """
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / "final", run_dir / ".final.tmp", run_dir / ".final.old"
    if not final.exists() and (old / RUN_META).is_file():
        os.replace(old, final)  # an earlier save was killed between its renames: that copy is complete
    if final.is_dir() and any(final.iterdir()) and not (final / RUN_META).is_file():
        raise InvalidInput(f"{final} holds files cervl did not write (no {RUN_META}); move them away first")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftovers from a killed save
    if meta.save == "merged":
        save_model(model, processor, tmp)
    else:
        tmp.mkdir(parents=True)
    write_json(tmp / RUN_META, asdict(meta))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        _test_kill("final-swap")
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _test_kill(point: str) -> None:
    """Tests set CERVL_TEST_KILL_AT=<point> to SIGKILL the process there (crash-safety tests)."""
    if os.environ.get("CERVL_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_checkpoints(stage_folder: Path) -> None:
    """A finished stage's checkpoints (its output replaces them); they are cervl's own files."""
    for name in ("checkpoint", ".checkpoint.old", ".checkpoint.tmp"):
        shutil.rmtree(Path(stage_folder) / name, ignore_errors=True)


def load_run(run_dir: str | Path, *, dtype: str | None = None):
    """Load a finished run: returns ``(model, processor, meta)``.

    ``save: merged`` runs load ``final/``; ``save: adapter`` runs rebuild the base and apply the
    stages in lineage order. ``dtype`` defaults to bf16 on a GPU and fp32 on the CPU.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "final").is_dir() and (run_dir / ".final.old" / RUN_META).is_file():
        os.replace(run_dir / ".final.old", run_dir / "final")  # a save was killed between its renames
    meta = RunMeta.read(run_dir)
    attn = default_attn_implementation()
    if meta.save == "merged":
        model, processor = load_model(run_dir / "final", dtype=dtype, attn_implementation=attn)
        return model, processor, meta
    model, processor = load_model(base_weights(meta.lineage[0], run_dir), dtype=dtype, attn_implementation=attn)
    for entry in meta.lineage[1:]:
        model = apply_stage(model, entry, run_dir)
    return model, processor, meta
