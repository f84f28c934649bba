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

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cervl.core.errors import InputNotFound, InvalidInput, UserError
from cervl.core.fsio import atomic_write_text, swap_in
from cervl.core.labels import LabelSet, get_label_set
from cervl.models.loading import TINY_BASE, TINY_PRESETS, default_attn_implementation, load_model, merge_lora, save_model
from cervl.models.prompts import PromptStyle, get_prompt_style

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MARKER = "cervl-run.json"
RUN_META = "cervl.json"
CKPT = "checkpoint"  # a stage's checkpoint folder (written by cervl.train.checkpoint)
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


class Layout:
    """Every name in a run folder. Other modules ask for paths here and never spell a name themselves;
    README's Architecture table lists, for each file, the one function that writes it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.marker, self.config, self.lineage = self.root / MARKER, self.root / "config.json", self.root / "lineage.json"
        self.base, self.final, self.eval = self.root / "base", self.root / "final", self.root / "eval"
        self.vision_cache, self.lock = self.root / "vision_cache", self.root / ".lock"
        self.bad_samples, self.test_metrics = self.root / "bad_samples.json", self.root / "test_metrics.json"

    def stage(self, index: int, name: str) -> "StageFiles":
        return StageFiles(self.root / "stages" / f"{index:02d}-{name}")


@dataclass(frozen=True)
class StageFiles:
    """The names inside one stage's folder ``stages/NN-name/``."""

    folder: Path

    @property
    def spec(self) -> Path:  # stage.json: the stage as planned (steps, samples per epoch, processes)
        return self.folder / "stage.json"

    @property
    def done(self) -> Path:  # DONE.json: the stage's StageRecord; its presence marks the stage finished
        return self.folder / "DONE.json"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.csv"

    @property
    def adapter(self) -> Path:
        return self.folder / "adapter"

    @property
    def weights(self) -> Path:
        return self.folder / "weights"

    @property
    def augment_preview(self) -> Path:  # augment.png: the stage's first training views, when augment is on
        return self.folder / "augment.png"


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return Layout(run_dir).stage(index, name).folder


@dataclass
class StageRecord:
    """One lineage entry, and a finished stage's ``DONE.json``: which weights a stage produced and how.

    Replaces a dict read back key by key. ``base`` entries name the starting weights (``source``,
    ``weights``); ``lora`` entries their ``adapter`` (+ ``rank``, ``alpha``); ``full`` entries their
    ``weights``. Paths are relative to the run folder. Keys this version does not know (from newer or older
    runs) are kept in ``extra`` and written back unchanged.
    """

    stage: str
    kind: str  # base | lora | full
    index: int | None = None
    source: str | None = None
    weights: str | None = None
    adapter: str | None = None
    rank: int | None = None
    alpha: int | None = None
    label_set: str | None = None
    prompt: str | None = None
    data: list | None = None
    steps: int | None = None
    skipped_steps: int | None = None
    levers: dict | None = None
    sharded: dict | None = None
    sampling: dict | None = None  # per-source sampling and the per-class counts the steps drew
    augment: dict | None = None  # the resolved augmentation (None: off)
    final_eval: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "StageRecord":
        if isinstance(d, StageRecord):
            return d
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        return {**d, **self.extra}

    @classmethod
    def read(cls, files: StageFiles) -> "StageRecord":
        return cls.from_dict(json.loads(files.done.read_text()))

    def write(self, files: StageFiles) -> None:
        """``DONE.json``: written last, when the stage's weights are saved; the stage is then never retrained."""
        write_json(files.done, self.to_dict())


def write_lineage(layout: Layout, records: list[StageRecord]) -> None:
    """``lineage.json``: every stage's record so far, base first."""
    write_json(layout.lineage, [r.to_dict() for r in records])


def write_stage_spec(files: StageFiles, spec: dict) -> None:
    """``stage.json``: the stage as planned, written when it starts."""
    files.folder.mkdir(parents=True, exist_ok=True)
    write_json(files.spec, spec)


def write_bad_samples(layout: Layout, bad: dict[str, str]) -> None:
    """``bad_samples.json``: the images ``skip_bad`` leaves out, with their reasons."""
    write_json(layout.bad_samples, sorted(bad.items()))


def write_test_metrics(layout: Layout, metrics: dict) -> None:
    """``test_metrics.json``: the held-out evaluation's summary (the report itself goes to ``eval/``)."""
    write_json(layout.test_metrics, metrics)


def save_base(model, processor, layout: Layout) -> None:
    """``base/``: a tiny preset's random-init weights, built once, so that resume and reload are exact."""
    save_model(model, processor, layout.base)


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
        path = final_dir(run_dir) / RUN_META
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


def final_dir(run_dir: str | Path) -> Path:
    """Where a reader finds the finished weights: ``final/``, or ``.final.old`` when a save was killed between
    its two renames (that copy is complete). Readers never move it back: recovery writes, and belongs to the
    process holding the run lock (:func:`save_final` in ``cervl train``)."""
    run_dir = Path(run_dir)
    final, old = run_dir / "final", run_dir / ".final.old"
    if not (final / RUN_META).is_file() and (old / RUN_META).is_file():
        return old
    return final


def write_json(path: Path, data) -> None:

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# Ownership and locking
# ----------------------------------------------------------------------------------------------

RUN_NAMES = {MARKER, "config.json", "lineage.json", "stages", "final", ".final.old", ".final.tmp", "base", "eval",
             "vision_cache", ".lock", "test_metrics.json", "bad_samples.json"}


def is_run(run_dir: Path) -> bool:
    """A folder cervl wrote as a run: its marker, or a run from before the marker whose files all are cervl's.

    A folder merely holding a ``config.json`` and a ``stages/`` is not enough: adopting it would overwrite
    that config and remove ``base/`` (a user's files). An old run has only cervl's top-level names, a
    ``config.json`` with ``model`` and ``stages``, and stage folders named ``NN-name``.
    """
    run_dir = Path(run_dir)
    if (run_dir / MARKER).is_file():
        return True
    if not ((run_dir / "config.json").is_file() and (run_dir / "stages").is_dir()):
        return False
    if any(p.name not in RUN_NAMES for p in run_dir.iterdir()):
        return False
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    stages_ok = all(p.is_dir() and re.fullmatch(r"\d{2}-[\w.-]+", p.name) for p in (run_dir / "stages").iterdir())
    return isinstance(config, dict) and isinstance(config.get("model"), dict) \
        and isinstance(config.get("stages"), list) and stages_ok


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
    layout = Layout(run_dir)
    saved = layout.config
    if saved.is_file():
        previous = json.loads(saved.read_text())
        current = json.loads(json.dumps(config, default=str))
        if previous.get("stages") != current["stages"] or previous.get("model") != current["model"]:
            if has_progress(run_dir):
                raise InvalidInput(f"{run_dir} holds a run with a different model or stages; choose another "
                                   f"output_dir (override: output_dir=...), or delete that run folder")
            log.warning("%s: replacing the config of a run that never finished or checkpointed a stage", run_dir)
            if previous.get("model") != current["model"]:
                shutil.rmtree(layout.base, ignore_errors=True)  # a tiny base cervl built for the old model
    write_json(saved, config)


class RunLock:
    """``RUN/.lock``: an OS lock (``flock``) held for the whole run; the file names the holder's pid and host.

    A second trainer on the same folder fails at once with the holder in the message. The kernel releases
    the lock when its process dies, so a stale lock is taken over (with a warning) by exactly one of
    any number of trainers that find it at the same moment.
    """

    def __init__(self, run_dir: Path):
        self.path = Layout(run_dir).lock
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            try:  # the holder before us may have unlinked the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = self._read(fd)
        if old.get("pid") is not None:
            log.warning("taking over the stale lock of %s (process %s on %s is gone)", self.path.parent,
                        old.get("pid"), old.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def _busy(self) -> UserError:
        try:
            other = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            other = {}
        return UserError(f"{self.path.parent} is in use by cervl train (pid {other.get('pid')} on {other.get('host')}, "
                         f"since {other.get('since')}); wait for it, or choose another output_dir")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting opener then finds a new file
            os.close(self.fd)
            self.fd = None


def base_entry(spec_name: str, run_dir: Path) -> StageRecord:
    """The lineage entry of a run's starting weights."""
    if spec_name in TINY_PRESETS:
        weights = "base"  # built once and saved in the run, so resume and reload are exact
    elif spec_name == "pretrained-tiny":
        weights = "pretrained-tiny"  # shipped inside the package, wherever it is installed
    else:
        local = Path(spec_name)
        weights = relative(run_dir, local) if local.exists() else spec_name  # a folder, or a hub id
    return StageRecord(stage="base", kind="base", source=spec_name, weights=weights)


def base_weights(entry: StageRecord | dict, run_dir: Path) -> Path | str:
    """Where a base entry's weights are: the package's tiny base, a folder, or a hub id."""
    entry = StageRecord.from_dict(entry)
    if entry.source == "pretrained-tiny":
        if not (TINY_BASE / "model.safetensors").is_file():
            raise InputNotFound(f"the shipped tiny base is missing at {TINY_BASE}; rebuild it with `cervl pretrain-tiny`")
        return TINY_BASE
    stored = entry.weights
    path = resolve(run_dir, stored)
    return path if path.exists() else stored


def apply_stage(model, entry: StageRecord | dict, run_dir: Path | None = None):
    """Bring ``model`` to the state right after the stage of ``entry`` (a lineage entry).

    LoRA stages: load the adapter, merge it, then copy the non-LoRA weights the stage trained
    (``extra_trainables.safetensors``: e.g. embeddings with ``lora.embeddings: full``). Full stages:
    load the stage's weights. This is the one place a stage's output is applied, for resume, for
    ``save: adapter`` runs and for :meth:`cervl.predict.Predictor.from_adapter`.
    """
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_safetensors

    entry = StageRecord.from_dict(entry)
    root = Path(run_dir) if run_dir is not None else Path(".")
    if entry.kind == "lora":
        from peft import PeftModel

        adapter = resolve(root, entry.adapter)
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
    if entry.kind == "full":
        load_safetensors(model, str(resolve(root, entry.weights) / "model.safetensors"))
        return model
    raise InvalidInput(f"lineage entry of stage {entry.stage!r} has unknown kind {entry.kind!r}")


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
    swap_in(tmp, final, old, crash="final-swap")
    return final


def remove_checkpoints(stage_folder: Path) -> None:
    """A finished stage's checkpoints (its output replaces them); they are cervl's own files."""
    for name in (CKPT, f".{CKPT}.old", f".{CKPT}.tmp"):
        shutil.rmtree(Path(stage_folder) / name, ignore_errors=True)


def load_run(run_dir: str | Path, *, dtype: str | None = None):
    """Load a finished run: returns ``(model, processor, meta)``.

    ``save: merged`` runs load ``final/``; ``save: adapter`` runs rebuild the base and apply the
    stages in lineage order. ``dtype`` defaults to bf16 on a GPU and fp32 on the CPU.
    """
    run_dir = Path(run_dir)
    meta = RunMeta.read(run_dir)  # reads only: predict, serve and every Ray actor may load at once, read-only
    attn = default_attn_implementation()
    if meta.save == "merged":
        model, processor = load_model(final_dir(run_dir), dtype=dtype, attn_implementation=attn)
        return model, processor, meta
    model, processor = load_model(base_weights(meta.lineage[0], run_dir), dtype=dtype, attn_implementation=attn)
    for entry in meta.lineage[1:]:
        model = apply_stage(model, entry, run_dir)
    return model, processor, meta
