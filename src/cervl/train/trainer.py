"""One training stage's loop: optimizer steps, logging, evaluation and checkpoints, then save and merge.

The stage's set-up (data, trainable weights, sharding, optimiser, resume, levers) is
:func:`cervl.train.stage_setup.set_up_stage`; the recipe that runs the stages is :func:`cervl.train.recipe.train`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cervl.train.checkpoint import rng_state
from cervl.train.config import RunConfig, StageConfig, to_dict
from cervl.models.encode import IGNORE
from cervl.core.errors import UserError
from cervl.evaluate.evaluation import evaluate
from cervl.core.faults import crash_point
from cervl.models.loading import (assert_finite_weights, merge_lora)
from cervl.run import (Layout, StageRecord, relative)
from cervl.train.sharding import (gather_unsharded, sync_replicated_grads)
from cervl.train.stage_setup import set_up_stage

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """A non-finite loss or gradient (with ``nan_policy: stop``)."""


class StageTrainer:
    """One stage: :meth:`setup` (data, trainable weights, sharding, optimiser, resume, levers), :meth:`train_step`
    and :meth:`after_step` for every step (logging, evaluation, checkpoints), and :meth:`finish` (save, merge)."""

    def __init__(self, model, processor, cfg: RunConfig, index: int, stage: StageConfig, run_dir: Path,
                 accelerator, bad: set, *, progress: bool = True, vision_memory: dict | None = None):
        self.model, self.processor, self.cfg, self.index, self.stage = model, processor, cfg, index, stage
        self.run_dir, self.acc, self.bad = run_dir, accelerator, bad
        self.progress, self.main = progress, accelerator.is_main_process
        self.files = Layout(run_dir).stage(index, stage.name)
        self.skipped_steps = 0
        self.vision_memory = vision_memory if vision_memory is not None else {}

    def run(self) -> tuple[object, StageRecord]:
        """Train the stage; returns (model with this stage merged, its record)."""
        self.setup()
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"stage {self.stage.name}", unit="step",
                   disable=not (self.progress and self.main))
        self.ddp_model.train()
        self.t_last, self.seen = time.perf_counter(), 0
        # Background preparation competes with the training threads on a CPU (34 vs 46-52 samples/s on 2 cores).
        prefetch = self.cfg.prefetch if self.cfg.prefetch is not None else torch.cuda.is_available()
        for step, batches in zip(range(self.start_step, self.total_steps),
                                 self.data.batches(self.start_step, prefetch=prefetch)):
            loss = self.train_step(step, batches)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            self.after_step(step, loss)
        bar.close()
        return self.finish()

    # --- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Set the stage up (:func:`cervl.train.stage_setup.set_up_stage`) and keep what it built."""
        s = set_up_stage(self.model, self.processor, self.cfg, self.index, self.stage, self.run_dir, self.acc,
                         self.bad, self.files, main=self.main, vision_memory=self.vision_memory)
        for name, value in vars(s).items():  # data, model, optimizer, scheduler, outputs, levers, ...
            setattr(self, name, value)

    # --- one optimizer step -------------------------------------------------------------------
    def train_step(self, step: int, batches: list[dict]) -> float:
        acc, device = self.acc, self.acc.device
        # Normalise by the answer tokens of the whole global batch, so N processes x M micro-batches
        # give exactly the gradient of one big batch (DDP averages, hence the * world).
        local_tokens = torch.tensor(float(sum((b["labels"][:, 1:] != IGNORE).sum() for b in batches)), device=device)
        global_tokens = acc.reduce(local_tokens, reduction="sum").clamp(min=1)
        loss_total = torch.zeros((), device=device)
        for a, batch in enumerate(batches):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = acc.no_sync(self.ddp_model) if a < len(batches) - 1 else contextlib.nullcontext()
            with sync:
                token_loss = self.ddp_model(**batch)  # summed cross-entropy of the answer tokens
                acc.backward(token_loss / global_tokens * self.world)
            loss_total += token_loss.detach()
        global_loss = (acc.reduce(loss_total, reduction="sum") / global_tokens).item()
        # The gradient norm doubles as the non-finite check (with no clipping, max_norm=inf scales by 1.0: exact).
        if self.sharded:
            sync_replicated_grads(self.params, self.world)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.stage.max_grad_norm or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        else:
            norm = acc.clip_grad_norm_(self.params, self.stage.max_grad_norm or float("inf"))
        if self._non_finite(global_loss, norm, step):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # the schedule follows the step count, taken or skipped
            return global_loss
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_loss

    def _non_finite(self, loss: float, grad_norm, step: int) -> bool:
        """True when this step must not update the weights; raises with ``nan_policy: stop``.

        The loss is already reduced over processes and the norm is the global one, so every process
        decides the same."""
        norm_ok = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        if math.isfinite(loss) and norm_ok:
            return False
        lr = self.scheduler.get_last_lr()[0]
        if self.cfg.nan_policy == "stop":
            raise TrainingDiverged(f"stage {self.stage.name}, step {step + 1}: non-finite loss or gradient "
                                   f"(loss {loss}, lr {lr:.3g}); nothing of this step was saved and the last "
                                   f"checkpoint stays valid. Lower the lr, or set nan_policy=skip_step")
        self.skipped_steps += 1
        log.warning("stage %s, step %d: non-finite loss or gradient; step skipped (%d so far)", self.stage.name,
                    step + 1, self.skipped_steps)
        return True

    # --- logging, evaluation, checkpoints -----------------------------------------------------
    def after_step(self, step: int, loss: float) -> None:
        stage, done, metrics = self.stage, step + 1, self.outputs.metrics
        self.seen += self.global_batch
        if done % self.cfg.log_every == 0 or done == self.total_steps:
            dt = time.perf_counter() - self.t_last
            metrics.write(stage=stage.name, step=done, epoch=self.data.epoch(done), loss=loss,
                          lr=self.scheduler.get_last_lr()[0], samples_per_s=round(self.seen / dt, 2),
                          skipped_steps=self.skipped_steps)
            self.t_last, self.seen = time.perf_counter(), 0
        if self.sharded:  # mid-stage evaluation and checkpoints need full weights (see setup)
            return
        if stage.eval.every and stage.eval.manifest and done % stage.eval.every == 0 and done < self.total_steps:
            if self.main:
                ev = self.evaluate()
                metrics.write(stage=stage.name, step=done, epoch=self.data.epoch(done), val_accuracy=ev["accuracy"],
                              val_macro_f1=ev["macro_f1"])
                self.ddp_model.train()
            self.acc.wait_for_everyone()
        if self.cfg.checkpoint_every and done % self.cfg.checkpoint_every == 0 and done < self.total_steps:
            rng = [rng_state()]
            if self.world > 1:  # every rank's own stream goes into rank 0's checkpoint
                rng = [None] * self.world
                torch.distributed.all_gather_object(rng, rng_state())
            self.outputs.checkpoint(self.model, self.trainable_names, self.optimizer, self.scheduler, rng,
                                    {"step": done, "total_steps": self.total_steps, "prompt": stage.style.name,
                                     "label_set": stage.labels.name})
            self.acc.wait_for_everyone()
            crash_point(f"checkpoint:{done}")

    def evaluate(self) -> dict:
        ev = self.stage.eval
        return evaluate(self.model, self.processor, self.stage.style, self.stage.labels, ev.manifest, ev.splits,
                        max_samples=ev.max_samples)

    # --- save and merge -----------------------------------------------------------------------
    def finish(self) -> tuple[object, StageRecord]:
        stage = self.stage
        sharded = None
        if self.sharded:  # every rank gets the full weights back: evaluate, save and merge see them whole
            self.model = gather_unsharded(self.model, self.skeleton)  # checked there: no DTensor, full shapes
            sharded = {"processes": self.world, "gathered_parameters": sum(p.numel() for p in self.model.parameters())}
        record = StageRecord(stage=stage.name, kind=stage.method, index=self.index, label_set=stage.labels.name,
                             prompt=stage.style.name, data=to_dict(stage.data), steps=self.total_steps,
                             skipped_steps=self.skipped_steps, levers=self.levers.record(self.objective),
                             sharded=sharded, sampling={"sources": [src.sampling for src in stage.data],
                                                        "drawn_per_class": self.data.drawn_counts()},
                             augment=to_dict(stage.augment.resolved()) if stage.augment.active() else None)
        if stage.method == "lora":
            record.rank, record.alpha = stage.lora.rank, stage.lora.alpha
            record.adapter = relative(self.run_dir, self.files.adapter)
        else:
            record.weights = relative(self.run_dir, self.files.weights)
        if stage.eval.manifest and self.main:
            record.final_eval = self.evaluate()
            self.outputs.metrics.write(stage=stage.name, step=self.total_steps, epoch=self.data.epoch(self.total_steps),
                                       val_accuracy=record.final_eval["accuracy"],
                                       val_macro_f1=record.final_eval["macro_f1"])
        if self.main:
            assert_finite_weights(self.model, f"stage {stage.name}")
        self.outputs.finish(self.model, stage.method, record)
        self.acc.wait_for_everyone()
        model = merge_lora(self.model) if stage.method == "lora" else self.model
        for p in model.parameters():
            p.requires_grad_(False)
        return model, record


__all__ = ["StageTrainer", "TrainingDiverged"]
