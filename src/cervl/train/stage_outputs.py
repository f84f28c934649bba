"""A training stage's files, written through :mod:`cervl.run`'s names: ``stage.json`` when it starts,
``metrics.csv`` as it goes, atomic checkpoints (and resuming from them), then the adapter or weights and
``DONE.json`` when it ends. Only the main process writes; every process reads a checkpoint back.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path


from cervl.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from cervl.core.errors import UserError
from cervl.run import EXTRA, StageFiles, StageRecord, remove_checkpoints, write_stage_spec

log = logging.getLogger(__name__)


class StageOutputs:
    """The files of one stage (``files``), for the main process (``main``) or read-only for the others."""

    def __init__(self, files: StageFiles, *, main: bool):
        self.files, self.main = files, main
        self.metrics: MetricsLog | None = None

    def start(self, spec: dict, *, resume_step: int, tensorboard: bool) -> None:
        """``stage.json`` and the metrics log (rows after ``resume_step``, from before a kill, are dropped)."""
        if self.main:
            write_stage_spec(self.files, spec)
        self.metrics = MetricsLog(self.files.metrics, enabled=self.main, tensorboard=tensorboard,
                                  resume_step=resume_step)

    def resume(self, model, optimizer, scheduler, *, rank: int, expected: dict) -> int:
        """Restore the last checkpoint, if any, and return its step (0 without one).

        ``expected``: the plan the checkpoint must have been written for (steps, prompt, label set); a
        checkpoint of another plan is refused rather than continued into a different run."""
        ckpt = find_checkpoint(self.files.folder)
        if ckpt is None:
            return 0
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
        changed = {k: (state.get(k), v) for k, v in expected.items() if k in state and state[k] != v}
        if changed:
            raise UserError(f"{ckpt} was written for another plan of stage {self.files.folder.name} "
                            f"(saved vs now: {changed}); the batch size, process count or data changed. Use "
                            f"another output_dir, or remove {ckpt} to restart the stage")
        log.info("stage %s: resuming from %s at step %d/%d", self.files.folder.name, ckpt, state["step"],
                 expected.get("total_steps", 0))
        return state["step"]

    def checkpoint(self, model, trainable_names: list[str], optimizer, scheduler, rng: list, state: dict) -> None:
        """An atomic checkpoint of the trainable weights, optimizer, scheduler and every rank's RNG."""
        if self.main:
            named = dict(model.named_parameters())
            save_checkpoint(self.files.folder, trainable={n: named[n] for n in trainable_names}, optimizer=optimizer,
                            scheduler=scheduler, rng=rng, state=state)

    def finish(self, model, method: str, record: StageRecord) -> None:
        """The stage's weights, then ``DONE.json`` (last: its presence marks the stage finished), then the
        checkpoints it replaces are removed."""
        if self.main:
            self._save_weights(model, method)
            record.write(self.files)
            remove_checkpoints(self.files.folder)
        if self.metrics is not None:
            self.metrics.close()

    def _save_weights(self, model, method: str) -> None:
        from safetensors.torch import save_file
        from safetensors.torch import save_model as save_safetensors  # handles tied embeddings

        if method == "lora":
            model.save_pretrained(self.files.adapter, safe_serialization=True)
            extra = {n.removeprefix("base_model.model."): p.detach().contiguous()
                     for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
            if extra:
                save_file(extra, self.files.adapter / EXTRA)
        else:
            self.files.weights.mkdir(parents=True, exist_ok=True)
            save_safetensors(model, str(self.files.weights / "model.safetensors"))


class MetricsLog:
    """Append-only CSV of training metrics (flushed per row), optionally mirrored to TensorBoard.

    On resume, rows after the resumed step (written before the kill) are dropped first, so the file
    never holds a step twice.
    """

    FIELDS = ["time", "stage", "step", "epoch", "loss", "lr", "samples_per_s", "skipped_steps", "val_accuracy",
              "val_macro_f1"]

    def __init__(self, path: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled, self.path, self.tb = enabled, path, None
        if enabled and path.is_file():
            self._truncate(resume_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                log.warning("tensorboard requested but not installed (pip install tensorboard); CSV only")

    def _truncate(self, step: int) -> None:
        from cervl.core.fsio import atomic_write_text

        with self.path.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def write(self, **row) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file()
        with self.path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS)
            if new:
                w.writeheader()
            w.writerow({"time": round(time.time(), 3), **row})
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row['stage']}/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


__all__ = ["MetricsLog", "StageOutputs"]
