"""Stage-wise training: ``cervl train CONFIG.yaml [key=value ...]``.

A recipe is a list of stages (see :mod:`cervl.train.config`). Between LoRA stages the previous adapter
is merged into the weights and a fresh adapter with the new stage's rank starts (the paper's
r=16 -> r=8). Each stage writes ``stages/NN-name/`` with its adapter (or full weights), metrics
and a ``DONE.json`` marker; a finished stage is never retrained, and an interrupted one resumes
from its last atomic checkpoint. The run folder's names belong to :mod:`cervl.run`.

Reads top to bottom: :func:`train` = checks, setup, stages, final save, held-out evaluation;
:class:`StageTrainer` = one stage's setup, steps and finish, from three parts that each read alone:
its data (:class:`cervl.train.stage_data.StageData`), its levers (:func:`cervl.train.objective.decide_levers`) and
its files (:class:`cervl.train.stage_outputs.StageOutputs`).
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
from cervl.models.encode import IGNORE, prompt_text
from cervl.core.errors import UserError
from cervl.evaluate.evaluation import evaluate, test_report
from cervl.core.faults import crash_point
from cervl.models.loading import (TINY_PRESETS, apply_lora, assert_finite_weights, build_tiny, default_attn_implementation,
                          load_model, lora_target_regex, merge_lora)
from cervl.train.objective import decide_levers
from cervl.predict.predictor import Predictor
from cervl.run import (Layout, RunLock, RunMeta, StageRecord, apply_stage, base_entry, base_weights, check_config,
                       claim_run_dir, relative, remove_checkpoints, save_base, save_final, write_bad_samples,
                       write_lineage, write_test_metrics)
from cervl.train.sharding import (Skeleton, gather_unsharded, refuse_unmergeable, refuse_unshardable, shard_model,
                            sync_replicated_grads, wants_sharding)
from cervl.train.stage_data import StageData, check_data
from cervl.train.stage_outputs import StageOutputs

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """A non-finite loss or gradient (with ``nan_policy: stop``)."""


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def train(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Run every stage of ``cfg`` (resuming finished/interrupted work), then evaluate on the test split."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    refuse_unmergeable(cfg, accelerator)  # ZeRO-3 + LoRA merges: stop now, not after hours of training
    refuse_unshardable(cfg, accelerator)  # FSDP with trained embeddings/head: stop before the run folder exists
    run_dir = Path(cfg.output_dir)
    # --- checks: everything a user can get wrong fails here, before a model loads or a file is written.
    bad = check_data(cfg, progress=progress and accelerator.is_main_process)
    if accelerator.is_main_process:
        claim_run_dir(run_dir)
    lock = RunLock(run_dir) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        if accelerator.is_main_process:
            check_config(run_dir, to_dict(cfg))
            if bad:
                write_bad_samples(Layout(run_dir), bad)
        accelerator.wait_for_everyone()
        return _train_locked(cfg, run_dir, accelerator, set(bad), progress)


def _train_locked(cfg: RunConfig, run_dir: Path, accelerator, bad: set, progress: bool) -> dict:
    layout = Layout(run_dir)
    # --- setup: the base weights (tiny presets are built once and saved in the run, so resume is exact).
    model, processor, base_info = load_base(cfg, run_dir, accelerator)

    # --- stages: each one starts from the merged result of the previous ones.
    lineage, stage_metrics, vision_memory = [base_info], {}, {}
    for index, stage in enumerate(cfg.stages):
        files = layout.stage(index, stage.name)
        if files.done.is_file():
            record = StageRecord.read(files)
            log.info("stage %s already finished; reusing %s", stage.name, files.folder)
            if accelerator.is_main_process:
                remove_checkpoints(files.folder)  # left behind if a kill came between DONE.json and the clean-up
            model = apply_stage(model, record, run_dir)
        else:
            trainer = StageTrainer(model, processor, cfg, index, stage, run_dir, accelerator, bad, progress=progress,
                                   vision_memory=vision_memory)
            model, record = trainer.run()
        lineage.append(record)
        stage_metrics[stage.name] = record.final_eval
        if accelerator.is_main_process:
            write_lineage(layout, lineage)

    # --- final save: merged weights (default) or the last adapter on top of the merged earlier stages.
    last = cfg.stages[-1]
    meta = RunMeta(prompt=last.style.name, label_set=last.labels.name, lineage=[r.to_dict() for r in lineage],
                   save=cfg.save, max_length=cfg.max_length, model=to_dict(cfg.model))
    if accelerator.is_main_process:
        assert_finite_weights(model, "the final model")
        save_final(model, processor, meta, run_dir)
    accelerator.wait_for_everyone()

    # --- held-out evaluation with the last stage's prompt and label set: predictions + report.
    result = {"run_dir": str(run_dir), "stages": stage_metrics}
    if cfg.test.manifest and accelerator.is_main_process:
        predictor = Predictor(model, processor, last.style, last.labels)
        result["test"] = test_report(predictor, cfg.test.manifest, cfg.test.splits, layout.eval,
                                     max_samples=cfg.test.max_samples, progress=progress,
                                     title=f"{last.name}: {Path(cfg.test.manifest).name} {'+'.join(cfg.test.splits)}")
        write_test_metrics(layout, result["test"])
    return result


def load_base(cfg: RunConfig, run_dir: Path, accelerator):
    """The starting weights and their lineage entry."""
    spec, layout = cfg.model, Layout(run_dir)
    entry = base_entry(spec.name, run_dir)
    if spec.name in TINY_PRESETS and not (layout.base / "model.safetensors").is_file():
        if accelerator.is_main_process:
            model, processor = build_tiny(spec.name, tokenizer_path=spec.tokenizer, seed=spec.seed)
            save_base(model, processor, layout)
        accelerator.wait_for_everyone()
    model, processor = load_model(base_weights(entry, run_dir), dtype=spec.dtype,
                                  attn_implementation=spec.attn_implementation or default_attn_implementation(),
                                  min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    model.to(accelerator.device)
    return model, processor, entry


# ----------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------

def make_scheduler(optimizer, stage: StageConfig, total_steps: int):
    warmup = stage.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if stage.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if stage.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_trainable(model, stage: StageConfig):
    """Wrap with a fresh LoRA (or unfreeze for full fine-tuning) following the stage's vision/merger choice."""
    torch.manual_seed(stage.seed)  # the adapter's initialisation is part of the recipe
    if stage.method == "lora":
        regex = lora_target_regex(tuple(stage.lora.targets), stage.lora.vision, stage.lora.merger)
        model = apply_lora(model, rank=stage.lora.rank, alpha=stage.lora.alpha, dropout=stage.lora.dropout,
                           target_regex=regex)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    for name, p in model.named_parameters():
        in_vision = ".visual." in f".{name}" and ".merger." not in name
        in_merger = ".merger." in name
        if (in_vision and stage.lora.vision == "full") or (in_merger and stage.lora.merger == "full"):
            p.requires_grad_(True)
        elif stage.method == "full" and ((in_vision and stage.lora.vision == "frozen")
                                         or (in_merger and stage.lora.merger == "frozen")):
            p.requires_grad_(False)
    if stage.lora.embeddings != "auto":
        model.get_input_embeddings().weight.requires_grad_(stage.lora.embeddings == "full")
    return model


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
        stage, acc, cfg = self.stage, self.acc, self.cfg
        self.world, self.rank = acc.num_processes, acc.process_index
        self.model = prepare_trainable(self.model, stage)
        if self.rank:  # each process its own dropout stream (rank 0 keeps the one-process stream)
            torch.manual_seed(stage.seed * 1009 + self.rank)
        self.sharded = wants_sharding(cfg, acc)
        if self.sharded:  # FSDP2 in place; the skeleton lets finish() rebuild full weights for the merge
            self.skeleton = Skeleton(self.model)
            shard_model(self.model)
            if self.main and (cfg.checkpoint_every or stage.eval.every):
                log.warning("sharding: fsdp writes no mid-stage checkpoints and runs no mid-stage evaluation; "
                            "stage %s is checkpointed when it ends (an interrupted stage restarts)", stage.name)
        # the levers first: whether images are hashed (vision cache) is part of what the data layer produces
        prompt = prompt_text(self.processor, stage.style, stage.labels)  # rendered once per stage
        self.levers = decide_levers(self.model, self.processor, cfg, stage, prompt, sharded=self.sharded,
                                    cache_dir=Layout(self.run_dir).vision_cache, memory=self.vision_memory)
        self.data = StageData(self.processor, cfg, stage, self.bad, world=self.world, rank=self.rank,
                              image_token_id=getattr(self.model.config, "image_token_id", None), prompt=prompt,
                              hash_images=self.levers.vision_cache is not None)
        self.total_steps, self.global_batch = self.data.total_steps, self.data.global_batch
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=stage.lr, weight_decay=stage.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, stage, self.total_steps)
        self.outputs = StageOutputs(self.files, main=self.main)
        self.start_step = self.outputs.resume(self.model, self.optimizer, self.scheduler, rank=self.rank,
                                              expected={"total_steps": self.total_steps, "prompt": stage.style.name,
                                                        "label_set": stage.labels.name})
        self.outputs.start({"index": self.index, **to_dict(stage), "total_steps": self.total_steps,
                            "samples_per_epoch": self.data.mixture.per_epoch, "world_size": self.world},
                           resume_step=self.start_step, tensorboard=cfg.tensorboard)
        if self.data.augmenter is not None and self.main:  # what the model sees, before it trains on it
            self.data.augment_preview(self.files.augment_preview)
        self.objective = self.levers.objective(self.model)
        if self.sharded:  # FSDP2 reduces the gradients itself: no DDP wrapper on top
            self.ddp_model = self.objective
        else:
            self.ddp_model, self.optimizer = acc.prepare(self.objective, self.optimizer)

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


__all__ = ["train", "load_base", "StageTrainer", "TrainingDiverged", "make_scheduler", "prepare_trainable"]
