"""Stage-wise training: ``cervl train CONFIG.yaml [key=value ...]``.

A recipe is a list of stages (see :mod:`cervl.config`). Between LoRA stages the previous adapter
is merged into the weights and a fresh adapter with the new stage's rank starts (the paper's
r=16 -> r=8). Each stage writes ``stages/NN-name/`` with its adapter (or full weights), metrics
and a ``DONE.json`` marker; a finished stage is never retrained, and an interrupted one resumes
from its last atomic checkpoint. The run folder's format belongs to :mod:`cervl.run`.

Reads top to bottom: :func:`train` = checks, setup, stages, final save, held-out evaluation;
:class:`StageTrainer` = one stage's setup, steps, evaluation/checkpoints, save and merge.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from cervl.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint
from cervl.config import RunConfig, StageConfig, to_dict
from cervl.data.images import check_images, image_size, load_rgb
from cervl.data.mixture import Mixture, Sample, load_samples
from cervl.encode import IGNORE, collate, encode_sample, pad_id, prompt_text, shared_prefix
from cervl.errors import UserError
from cervl.faults import crash_point
from cervl.evaluate import evaluate, test_report
from cervl.models import (TINY_PRESETS, apply_lora, assert_finite_weights, build_tiny, default_attn_implementation,
                          load_model, lora_target_regex, merge_lora, save_model)
from cervl.objective import AnswerObjective, VisionCache, file_hash
from cervl.predict.predictor import Predictor
from cervl.sharding import (Skeleton, gather_unsharded, refuse_unmergeable, refuse_unshardable, shard_model,
                            sync_replicated_grads, wants_sharding)
from cervl.run import (EXTRA, RunLock, RunMeta, apply_stage, base_entry, base_weights, check_config, claim_run_dir,
                       relative, remove_checkpoints, save_final, stage_dir, write_json)

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
                write_json(run_dir / "bad_samples.json", sorted(bad.items()))
        accelerator.wait_for_everyone()
        return _train_locked(cfg, run_dir, accelerator, set(bad), progress)


def _train_locked(cfg: RunConfig, run_dir: Path, accelerator, bad: set, progress: bool) -> dict:
    # --- setup: the base weights (tiny presets are built once and saved in the run, so resume is exact).
    model, processor, base_info = load_base(cfg, run_dir, accelerator)

    # --- stages: each one starts from the merged result of the previous ones.
    lineage, stage_metrics, vision_memory = [base_info], {}, {}
    for index, stage in enumerate(cfg.stages):
        sdir = stage_dir(run_dir, index, stage.name)
        if (sdir / "DONE.json").is_file():
            info = json.loads((sdir / "DONE.json").read_text())
            log.info("stage %s already finished; reusing %s", stage.name, sdir)
            if accelerator.is_main_process:
                remove_checkpoints(sdir)  # left behind if a kill came between DONE.json and the clean-up
            model = apply_stage(model, info, run_dir)
        else:
            trainer = StageTrainer(model, processor, cfg, index, stage, run_dir, accelerator, bad, progress=progress,
                                   vision_memory=vision_memory)
            model, info = trainer.run()
        lineage.append(info)
        stage_metrics[stage.name] = info.get("final_eval")
        if accelerator.is_main_process:
            write_json(run_dir / "lineage.json", lineage)

    # --- final save: merged weights (default) or the last adapter on top of the merged earlier stages.
    last = cfg.stages[-1]
    meta = RunMeta(prompt=last.style.name, label_set=last.labels.name, lineage=lineage, save=cfg.save,
                   max_length=cfg.max_length, model=to_dict(cfg.model))
    if accelerator.is_main_process:
        assert_finite_weights(model, "the final model")
        save_final(model, processor, meta, run_dir)
    accelerator.wait_for_everyone()

    # --- held-out evaluation with the last stage's prompt and label set: predictions + report.
    result = {"run_dir": str(run_dir), "stages": stage_metrics}
    if cfg.test.manifest and accelerator.is_main_process:
        predictor = Predictor(model, processor, last.style, last.labels)
        result["test"] = test_report(predictor, cfg.test.manifest, cfg.test.splits, run_dir / "eval",
                                     max_samples=cfg.test.max_samples, progress=progress,
                                     title=f"{last.name}: {Path(cfg.test.manifest).name} {'+'.join(cfg.test.splits)}")
        write_json(run_dir / "test_metrics.json", result["test"])
    return result


def check_data(cfg: RunConfig, *, progress: bool = False) -> dict[str, str]:
    """Check every manifest, split and label, then every image training reads; return the bad ones.

    All bad images are reported at once. With ``skip_bad`` they are returned (path -> reason) and
    the stages leave them out; without it, the first check that fails raises.
    """
    paths: dict[Path, str] = {}
    for stage in cfg.stages:
        for sample in stage_samples(stage, bad=set()):
            paths.setdefault(sample.path, sample.name)
        if stage.eval.manifest:
            for sample in load_samples(stage.eval.manifest, stage.eval.splits, stage.labels):
                paths.setdefault(sample.path, sample.name)
    if cfg.test.manifest:
        load_samples(cfg.test.manifest, cfg.test.splits, cfg.stages[-1].labels)  # images: error rows at test time
    bad = check_images(list(paths), progress=progress)
    if bad and not cfg.skip_bad:
        listing = "\n".join(f"  {reason}" for reason in list(bad.values())[:50])  # each reason names its file
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        raise UserError(f"{len(bad)} of {len(paths)} training/eval images cannot be used:\n{listing}{more}\n"
                        f"fix or remove them, or set skip_bad=true to train without them")
    if bad:
        log.warning("skip_bad: leaving out %d of %d images (listed in bad_samples.json)", len(bad), len(paths))
    return {str(p): r for p, r in bad.items()}


def stage_samples(stage: StageConfig, bad: set) -> list[Sample]:
    """Every training sample of a stage (all sources), minus the known-bad images."""
    return [s for src in stage.data for s in source_samples(stage, src, bad)]


def source_samples(stage: StageConfig, src, bad: set) -> list[Sample]:
    """One data source's training samples, minus the known-bad images."""
    need_aus = stage.style.answers_with == "aus"
    return [s for s in load_samples(src.manifest, src.splits, stage.labels, need_aus=need_aus) if str(s.path) not in bad]


def load_base(cfg: RunConfig, run_dir: Path, accelerator):
    """The starting weights and their lineage entry."""
    spec = cfg.model
    entry = base_entry(spec.name, run_dir)
    if spec.name in TINY_PRESETS and not (run_dir / "base" / "model.safetensors").is_file():
        if accelerator.is_main_process:
            model, processor = build_tiny(spec.name, tokenizer_path=spec.tokenizer, seed=spec.seed)
            save_model(model, processor, run_dir / "base")
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
    """One stage: :meth:`setup` (data, trainable policy, optimizer, resume), :meth:`train_step`,
    :meth:`after_step` (logging, evaluation, checkpoints) and :meth:`finish` (save, merge)."""

    def __init__(self, model, processor, cfg: RunConfig, index: int, stage: StageConfig, run_dir: Path,
                 accelerator, bad: set, *, progress: bool = True, vision_memory: dict | None = None):
        self.model, self.processor, self.cfg, self.index, self.stage = model, processor, cfg, index, stage
        self.run_dir, self.dir, self.acc = run_dir, stage_dir(run_dir, index, stage.name), accelerator
        self.bad, self.progress, self.main = bad, progress, accelerator.is_main_process
        self.skipped_steps = 0
        self.vision_memory = vision_memory if vision_memory is not None else {}

    def run(self):
        """Train the stage; returns (model with this stage merged, lineage entry)."""
        self.setup()
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"stage {self.stage.name}", unit="step",
                   disable=not (self.progress and self.main))
        self.ddp_model.train()
        self.t_last, self.seen = time.perf_counter(), 0
        for step, batches in zip(range(self.start_step, self.total_steps), self.batches()):
            loss = self.train_step(step, batches)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            self.after_step(step, loss)
        bar.close()
        return self.finish()

    def batches(self):
        """Every remaining step's micro-batches, in order: from ``num_workers`` DataLoader processes, one
        background thread (``prefetch``), or inline. ``prepare`` is a pure function of the step, so all
        three give the same batches."""
        steps = range(self.start_step, self.total_steps)
        if self.cfg.num_workers > 0:
            loader = torch.utils.data.DataLoader(_Steps(self.prepare, self.total_steps), batch_size=None,
                                                 sampler=steps, num_workers=self.cfg.num_workers,
                                                 collate_fn=_identity, prefetch_factor=2,
                                                 # its own generator: seeding the workers must not advance the
                                                 # global RNG, which drives dropout (results stay identical)
                                                 generator=torch.Generator().manual_seed(0))
            yield from loader
        elif self.prefetch:  # one background thread prepares step t+1 while step t trains
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(self.prepare, steps[0]) if len(steps) else None
                for step in steps:
                    batches = pending.result()
                    if step + 1 < self.total_steps:
                        pending = pool.submit(self.prepare, step + 1)
                    yield batches
        else:
            for step in steps:
                yield self.prepare(step)

    # --- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        stage, acc = self.stage, self.acc
        self.world, self.rank = acc.num_processes, acc.process_index
        self.global_batch = stage.batch_size * stage.grad_accum * self.world
        self.mixture = Mixture([(source_samples(stage, src, self.bad), src.weight) for src in stage.data],
                               seed=stage.seed, group=50 * self.global_batch if self.cfg.group_by_length else 0,
                               length=lambda s: math.prod(image_size(s.path)))
        self.total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * self.mixture.per_epoch / self.global_batch))
        self.prompt = prompt_text(self.processor, stage.style, stage.labels)  # rendered once per stage
        self.hashes: dict = {}
        self.model = prepare_trainable(self.model, stage)
        if self.rank:  # each process its own dropout stream (rank 0 keeps the one-process stream)
            torch.manual_seed(stage.seed * 1009 + self.rank)
        self.sharded = wants_sharding(self.cfg, acc)
        if self.sharded:  # FSDP2 in place; the skeleton lets finish() rebuild full weights for the merge
            self.skeleton = Skeleton(self.model)
            shard_model(self.model)
            if self.main and (self.cfg.checkpoint_every or stage.eval.every):
                log.warning("sharding: fsdp writes no mid-stage checkpoints and runs no mid-stage evaluation; "
                            "stage %s is checkpointed when it ends (an interrupted stage restarts)", stage.name)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=stage.lr, weight_decay=stage.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, stage, self.total_steps)
        self.start_step = self._resume()
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / "stage.json", {"index": self.index, **to_dict(stage), "total_steps": self.total_steps,
                                                 "samples_per_epoch": self.mixture.per_epoch, "world_size": self.world})
        self.objective = self._objective()
        if self.sharded:  # FSDP2 reduces the gradients itself: no DDP wrapper on top
            self.ddp_model = self.objective
        else:
            self.ddp_model, self.optimizer = acc.prepare(self.objective, self.optimizer)
        self.metrics = MetricsLog(self.dir / "metrics.csv", enabled=self.main, tensorboard=self.cfg.tensorboard,
                                  resume_step=self.start_step)
        tok = self.processor.tokenizer
        self.pad_id = pad_id(tok)
        self.image_token_id = getattr(self.model.config, "image_token_id", None)
        # Background preparation competes with the training threads on a CPU (34 vs 46-52 samples/s on 2 cores).
        self.prefetch = self.cfg.prefetch if self.cfg.prefetch is not None else torch.cuda.is_available()

    def _objective(self) -> AnswerObjective:
        """The loss module with the stage's levers: answer-only logits always; shared prefix and
        vision cache where they apply (see cervl.objective)."""
        cfg, stage, tok = self.cfg, self.stage, self.processor.tokenizer
        checkpointing = cfg.gradient_checkpointing
        if checkpointing is None:  # auto: real models above 3B parameters
            checkpointing = sum(p.numel() for p in self.model.parameters()) > 3e9
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        prefix = None
        # Not when sharded: the prefix's keys/values reach the loss through the cache, not through the core's
        # output, so FSDP would not re-gather the (resharded) weights for that part of the backward.
        if cfg.shared_prefix and not checkpointing and not self.sharded:
            prefix = shared_prefix(tok, self.prompt)
        frozen_vision = stage.method == "lora" and stage.lora.vision == "frozen" and stage.lora.merger == "frozen"
        cache = None
        # the memory store outlives the stage: later stages reuse it. Not when sharded: a cache hit on one
        # rank and a miss on another would run the (sharded) vision tower on one rank only, and hang.
        if cfg.vision_cache_mb and frozen_vision and not self.sharded:
            cache = VisionCache(self.model, self.processor, self.run_dir / "vision_cache", cfg.vision_cache_mb,
                                memory=self.vision_memory)
        return AnswerObjective(self.model, prefix=prefix, vision_cache=cache)

    def _resume(self) -> int:
        ckpt = find_checkpoint(self.dir)
        if ckpt is None:
            return 0
        state = load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                rank=self.rank)
        expected = {"total_steps": self.total_steps, "prompt": self.stage.style.name,
                    "label_set": self.stage.labels.name}
        changed = {k: (state.get(k), v) for k, v in expected.items() if k in state and state[k] != v}
        if changed:
            raise UserError(f"{ckpt} was written for another plan of stage {self.stage.name} "
                            f"(saved vs now: {changed}); the batch size, process count or data changed. Use "
                            f"another output_dir, or remove {ckpt} to restart the stage")
        log.info("stage %s: resuming from %s at step %d/%d", self.stage.name, ckpt, state["step"], self.total_steps)
        return state["step"]

    def prepare(self, step: int):
        """This process's share of every micro-batch of ``step``: a pure function of the step number,
        which is what makes resuming exact and lets the next step be prepared in the background."""
        stage, micro = self.stage, []
        for a in range(stage.grad_accum):
            first = step * self.global_batch + a * stage.batch_size * self.world + self.rank * stage.batch_size
            micro.append(self.mixture.take(first, stage.batch_size))
        encoded = [[encode_sample(self.processor, self.prompt, load_rgb(s.path),
                                  stage.style.answer(s.record.label, s.record.aus), max_length=self.cfg.max_length,
                                  sample_name=s.name) for s in mb] for mb in micro]
        batches = [collate(e, self.pad_id, self.image_token_id) for e in encoded]
        if self.objective.vision_cache is not None:
            for batch, mb in zip(batches, micro):
                batch["image_hashes"] = [self._hash(s.path) for s in mb]
        return batches

    def _hash(self, path) -> str:
        h = self.hashes.get(path)
        if h is None:
            h = self.hashes[path] = file_hash(path)
        return h

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
        stage, done = self.stage, step + 1
        self.seen += self.global_batch
        epoch = round(done * self.global_batch / self.mixture.per_epoch, 4)
        if done % self.cfg.log_every == 0 or done == self.total_steps:
            dt = time.perf_counter() - self.t_last
            self.metrics.write(stage=stage.name, step=done, epoch=epoch, loss=loss,
                               lr=self.scheduler.get_last_lr()[0], samples_per_s=round(self.seen / dt, 2),
                               skipped_steps=self.skipped_steps)
            self.t_last, self.seen = time.perf_counter(), 0
        if self.sharded:  # mid-stage evaluation and checkpoints need full weights (see setup)
            return
        if stage.eval.every and stage.eval.manifest and done % stage.eval.every == 0 and done < self.total_steps:
            if self.main:
                ev = self.evaluate()
                self.metrics.write(stage=stage.name, step=done, epoch=epoch, val_accuracy=ev["accuracy"],
                                   val_macro_f1=ev["macro_f1"])
                self.ddp_model.train()
            self.acc.wait_for_everyone()
        if self.cfg.checkpoint_every and done % self.cfg.checkpoint_every == 0 and done < self.total_steps:
            rng = [rng_state()]
            if self.world > 1:  # every rank's own stream goes into rank 0's checkpoint
                rng = [None] * self.world
                torch.distributed.all_gather_object(rng, rng_state())
            if self.main:
                named = dict(self.model.named_parameters())
                save_checkpoint(self.dir, trainable={n: named[n] for n in self.trainable_names},
                                optimizer=self.optimizer, scheduler=self.scheduler, rng=rng,
                                state={"step": done, "total_steps": self.total_steps, "prompt": stage.style.name,
                                       "label_set": stage.labels.name})
            self.acc.wait_for_everyone()
            crash_point(f"checkpoint:{done}")

    def evaluate(self) -> dict:
        ev = self.stage.eval
        return evaluate(self.model, self.processor, self.stage.style, self.stage.labels, ev.manifest, ev.splits,
                        max_samples=ev.max_samples)

    # --- save and merge -----------------------------------------------------------------------
    def finish(self):
        stage = self.stage
        sharded = None
        if self.sharded:  # every rank gets the full weights back: evaluate, save and merge see them whole
            self.model = gather_unsharded(self.model, self.skeleton)  # checked there: no DTensor, full shapes
            sharded = {"processes": self.world, "gathered_parameters": sum(p.numel() for p in self.model.parameters())}
        info = {"stage": stage.name, "kind": stage.method, "index": self.index, "label_set": stage.labels.name,
                "prompt": stage.style.name, "data": to_dict(stage.data), "steps": self.total_steps,
                "skipped_steps": self.skipped_steps, **self.objective.lever_record(), "sharded": sharded}
        if stage.method == "lora":
            info.update(rank=stage.lora.rank, alpha=stage.lora.alpha, adapter=relative(self.run_dir, self.dir / "adapter"))
        else:
            info.update(weights=relative(self.run_dir, self.dir / "weights"))
        if stage.eval.manifest and self.main:
            info["final_eval"] = self.evaluate()
            self.metrics.write(stage=stage.name, step=self.total_steps,
                               epoch=round(self.total_steps * self.global_batch / self.mixture.per_epoch, 4),
                               val_accuracy=info["final_eval"]["accuracy"], val_macro_f1=info["final_eval"]["macro_f1"])
        if self.main:
            assert_finite_weights(self.model, f"stage {stage.name}")
            self._save_output()
            write_json(self.dir / "DONE.json", info)
            remove_checkpoints(self.dir)
        self.acc.wait_for_everyone()
        self.metrics.close()
        model = merge_lora(self.model) if stage.method == "lora" else self.model
        for p in model.parameters():
            p.requires_grad_(False)
        return model, info

    def _save_output(self) -> None:
        from safetensors.torch import save_file
        from safetensors.torch import save_model as save_safetensors  # handles tied embeddings

        if self.stage.method == "lora":
            self.model.save_pretrained(self.dir / "adapter", safe_serialization=True)
            extra = {n.removeprefix("base_model.model."): p.detach().contiguous()
                     for n, p in self.model.named_parameters() if p.requires_grad and "lora_" not in n}
            if extra:
                save_file(extra, self.dir / "adapter" / EXTRA)
        else:
            (self.dir / "weights").mkdir(parents=True, exist_ok=True)
            save_safetensors(self.model, str(self.dir / "weights" / "model.safetensors"))


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
        from cervl.data.manifest import atomic_write_text

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


class _Steps(torch.utils.data.Dataset):
    """Step number -> that step's micro-batches (for DataLoader worker processes)."""

    def __init__(self, prepare, total: int):
        self.prepare, self.total = prepare, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int):
        return self.prepare(step)


def _identity(x):
    return x


__all__ = ["train", "check_data", "load_base", "StageTrainer", "TrainingDiverged", "make_scheduler"]
