"""Stage-wise training: ``cervl train CONFIG.yaml [key=value ...]``.

A recipe is a list of stages (see :mod:`cervl.config`). Between LoRA stages the previous adapter
is merged into the weights and a fresh adapter with the new stage's rank starts (the paper's
r=16 -> r=8). Each stage writes ``stages/NN-name/`` with its adapter (or full weights), metrics
and a ``DONE.json`` marker; a finished stage is never retrained, and an interrupted one resumes
from its last atomic checkpoint. The run directory holds the resolved config, the lineage and,
in ``final/``, a model that :func:`load_run` (and ``cervl predict``) can use without the command.

Reads top to bottom: :func:`train` = setup, stages, final save, held-out evaluation.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cervl.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from cervl.config import RunConfig, StageConfig, to_dict
from cervl.data.mixture import DataError, Mixture, load_samples
from cervl.encode import IGNORE, collate, encode_sample
from cervl.labels import get_label_set
from cervl.models import (TINY_PRESETS, apply_lora, build_tiny, load_model, lora_target_regex, merge_lora,
                          save_model, write_json)
from cervl.predict import load_rgb, score_labels
from cervl.prompts import get_prompt_style

log = logging.getLogger(__name__)

ASSET_BASE = Path(__file__).parent / "assets" / "tiny-base"
RUN_META = "cervl.json"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def train(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Run every stage of ``cfg`` (resuming finished/interrupted work), then evaluate on the test split."""
    from accelerate import Accelerator

    # --- setup: the run directory is the unit of resumption; refuse to mix two different recipes in it.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    run_dir = Path(cfg.output_dir)
    _check_run_dir(run_dir, cfg, accelerator)
    _check_data(cfg)  # fail before any model is built if a manifest, split or label is wrong
    model, processor, base_info = load_base(cfg, run_dir, accelerator)

    # --- stages: each one starts from the merged result of the previous ones.
    lineage = [base_info]
    stage_metrics = {}
    for index, stage in enumerate(cfg.stages):
        stage_dir = run_dir / "stages" / f"{index:02d}-{stage.name}"
        done = stage_dir / "DONE.json"
        if done.is_file():
            info = json.loads(done.read_text())
            log.info("stage %s already finished; reusing %s", stage.name, stage_dir)
            model = _restore_finished_stage(model, stage, stage_dir)
        else:
            model, info = run_stage(model, processor, cfg, index, stage, stage_dir, accelerator, progress=progress)
        lineage.append(info)
        stage_metrics[stage.name] = info.get("final_eval")
        if accelerator.is_main_process:
            write_json(run_dir / "lineage.json", lineage)

    # --- final save: merged weights (default) or the last adapter on top of the merged earlier stages.
    last = cfg.stages[-1]
    if accelerator.is_main_process:
        save_final(model, processor, cfg, run_dir, lineage)
    accelerator.wait_for_everyone()

    # --- held-out evaluation with the last stage's prompt and label set: predictions + report.
    result = {"run_dir": str(run_dir), "stages": stage_metrics}
    if cfg.test.manifest and accelerator.is_main_process:
        result["test"] = test_report(model, processor, last, cfg.test, run_dir / "eval", progress=progress)
        write_json(run_dir / "test_metrics.json", result["test"])
    return result


def test_report(model, processor, stage: StageConfig, test, out_dir: Path, *, progress: bool = True) -> dict:
    """Score the test split, write ``test_predictions.jsonl`` and the report folder; return the metrics."""
    from cervl.data.manifest import atomic_write_text
    from cervl.predict import Predictor
    from cervl.report import evaluate_predictions

    label_set = get_label_set(stage.label_set)
    samples = load_samples(test.manifest, test.splits, label_set)
    if test.max_samples and len(samples) > test.max_samples:
        idx = np.random.default_rng(0).choice(len(samples), test.max_samples, replace=False)
        samples = [samples[i] for i in sorted(idx)]
    items = [{"id": s.record.sample_id, "image": s.path, "label": s.record.label, "video": s.record.video,
              "frame": s.record.frame} for s in samples]
    predictor = Predictor(model, processor, stage.prompt, label_set)
    rows = list(predictor.predict(items, mode="score", progress=progress))
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "test_predictions.jsonl"
    atomic_write_text(pred_path, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(Path(str(pred_path) + ".meta.json"), json.dumps(
        {"mode": "score", "normalize": "sum", "label_set": label_set.name, "prompt": stage.prompt,
         "manifest": str(test.manifest), "splits": test.splits}, indent=2) + "\n")
    metrics = evaluate_predictions(pred_path, out_dir / "report", title=f"{stage.name}: {Path(test.manifest).name} "
                                   f"{'+'.join(test.splits)}")
    return {"label_set": label_set.name, "predictions": str(pred_path), **metrics}


# ----------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------

def _check_run_dir(run_dir: Path, cfg: RunConfig, accelerator) -> None:
    saved = run_dir / "config.json"
    current = to_dict(cfg)
    if saved.is_file():
        previous = json.loads(saved.read_text())
        if previous.get("stages") != json.loads(json.dumps(current["stages"])) or previous.get("model") != current["model"]:
            raise ValueError(f"{run_dir} holds a run with a different model or stages; choose another "
                             f"output_dir (override: output_dir=...) or delete it")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(saved, current)


def _check_data(cfg: RunConfig) -> None:
    for stage in cfg.stages:
        label_set, style = get_label_set(stage.label_set), get_prompt_style(stage.prompt)
        for src in stage.data:
            load_samples(src.manifest, src.splits, label_set, need_aus=style.answers_with == "aus")
        if stage.eval.manifest:
            load_samples(stage.eval.manifest, stage.eval.splits, label_set)


def load_base(cfg: RunConfig, run_dir: Path, accelerator):
    """The starting weights. Tiny presets are built once and saved in the run (so resume is exact)."""
    spec = cfg.model
    base_dir = run_dir / "base"
    if spec.name in TINY_PRESETS:
        if not (base_dir / "model.safetensors").is_file():
            if accelerator.is_main_process:
                model, processor = build_tiny(spec.name, tokenizer_path=spec.tokenizer, seed=spec.seed)
                save_model(model, processor, base_dir)
            accelerator.wait_for_everyone()
        source, path = spec.name, base_dir
    elif spec.name == "pretrained-tiny":
        source, path = spec.name, ASSET_BASE
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"the shipped tiny base is missing at {path}; rebuild it with `cervl pretrain-tiny`")
    else:
        source, path = spec.name, spec.name
    dtype = spec.dtype
    model, processor = load_model(path, dtype=dtype, attn_implementation=spec.attn_implementation or "sdpa",
                                  min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    model.to(accelerator.device)
    return model, processor, {"stage": "base", "kind": "base", "source": str(source), "weights": str(path)}


def _restore_finished_stage(model, stage: StageConfig, stage_dir: Path):
    """Bring the in-memory model to the state right after ``stage`` (merging its adapter)."""
    if stage.method == "full":
        from safetensors.torch import load_model as load_safetensors

        load_safetensors(model, str(stage_dir / "weights" / "model.safetensors"))
        return model
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, stage_dir / "adapter")
    merged = merge_lora(peft_model)
    _load_extra(merged, stage_dir / "adapter")
    return merged


# ----------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------

def _prepare_trainable(model, stage: StageConfig):
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


EXTRA = "extra_trainables.safetensors"  # non-LoRA weights a LoRA stage trained (embeddings, full vision...)


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _load_extra(model, adapter_dir: Path) -> None:
    """Copy a LoRA stage's non-LoRA trained weights into a (merged) model."""
    path = Path(adapter_dir) / EXTRA
    if not path.is_file():
        return
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(path).items():
            if name not in params:
                raise ValueError(f"{path}: parameter {name} not in the model")
            params[name].copy_(tensor)


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


def run_stage(model, processor, cfg: RunConfig, index: int, stage: StageConfig, stage_dir: Path, accelerator,
              *, progress: bool = True):
    """Train one stage; returns (model with this stage merged, lineage entry)."""
    label_set, style = get_label_set(stage.label_set), get_prompt_style(stage.prompt)
    sources = [(load_samples(s.manifest, s.splits, label_set, need_aus=style.answers_with == "aus"), s.weight)
               for s in stage.data]
    mixture = Mixture(sources, seed=stage.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = stage.batch_size * stage.grad_accum * world
    total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * mixture.per_epoch / global_batch))

    model = _prepare_trainable(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = make_scheduler(optimizer, stage, total_steps)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]

    start_step = 0
    ckpt = find_checkpoint(stage_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = state["step"]
        log.info("stage %s: resuming from %s at step %d/%d", stage.name, ckpt, start_step, total_steps)
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json(stage_dir / "stage.json", {"index": index, **asdict(stage), "total_steps": total_steps,
                                              "samples_per_epoch": mixture.per_epoch, "world_size": world})
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    metrics = MetricsLog(stage_dir / "metrics.csv", enabled=accelerator.is_main_process,
                         tensorboard=cfg.tensorboard)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    image_token_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else None

    bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage.name}", unit="step",
               disable=not (progress and accelerator.is_main_process))
    t_last, seen = time.perf_counter(), 0
    def prepare(step: int):
        """This process's share of every micro-batch of ``step``: a pure function of the step number,
        which is what makes resuming exact and lets the next step be prepared in the background."""
        micro = []
        for a in range(stage.grad_accum):
            first = step * global_batch + a * stage.batch_size * world + rank * stage.batch_size
            micro.append(mixture.take(first, stage.batch_size))
        encoded = [[encode_sample(processor, style, label_set, load_rgb(s.path),
                                  style.answer(s.record.label, s.record.aus), max_length=cfg.max_length,
                                  sample_name=s.name) for s in mb] for mb in micro]
        return micro, [collate(e, pad_id, image_token_id) for e in encoded]

    # One background thread decodes and encodes step t+1 while step t trains.
    from concurrent.futures import ThreadPoolExecutor

    prefetch = cfg.prefetch if cfg.prefetch is not None else torch.cuda.is_available()
    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
    pending = pool.submit(prepare, start_step) if pool and start_step < total_steps else None
    ddp_model.train()
    for step in range(start_step, total_steps):
        if pool:
            micro, batches = pending.result()
            if step + 1 < total_steps:
                pending = pool.submit(prepare, step + 1)
        else:
            micro, batches = prepare(step)
        # Normalise by the answer tokens of the whole global batch, so N processes x M micro-batches
        # give exactly the gradient of one big batch (DDP averages, hence the * world).
        local_tokens = torch.tensor(float(sum((b["labels"][:, 1:] != IGNORE).sum() for b in batches)),
                                    device=accelerator.device)
        global_tokens = accelerator.reduce(local_tokens, reduction="sum").clamp(min=1)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d step %d samples %s tokens %d/%d", rank, step,
                      [s.record.sample_id for mb in micro for s in mb], int(local_tokens), int(global_tokens))
        loss_total = 0.0
        for a, batch in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            ctx = accelerator.no_sync(ddp_model) if a < len(batches) - 1 else _nullcontext()
            with ctx:
                logits = ddp_model(**batch).logits
                token_loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                    reduction="sum")
                loss = token_loss / global_tokens * world
                accelerator.backward(loss)
            loss_total += token_loss.detach()
            log.debug("rank %d step %d micro %d token loss sum %.6f", rank, step, a, token_loss.item())
        if stage.max_grad_norm:
            accelerator.clip_grad_norm_(params, stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seen += global_batch
        global_loss = (accelerator.reduce(loss_total.clone(), reduction="sum") / global_tokens).item()
        bar.update()
        epoch = (step + 1) * global_batch / mixture.per_epoch
        rate = seen / max(time.perf_counter() - t_last, 1e-9)
        bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{global_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        samples_s=f"{rate:.1f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            dt = time.perf_counter() - t_last
            metrics.write(stage=stage.name, step=step + 1, epoch=round(epoch, 4), loss=global_loss,
                          lr=scheduler.get_last_lr()[0], samples_per_s=round(seen / dt, 2))
            t_last, seen = time.perf_counter(), 0
        if stage.eval.every and stage.eval.manifest and (step + 1) % stage.eval.every == 0 and step + 1 < total_steps:
            if accelerator.is_main_process:
                ev = evaluate(model, processor, stage, stage.eval.manifest, stage.eval.splits,
                              max_samples=stage.eval.max_samples)
                metrics.write(stage=stage.name, step=step + 1, epoch=round(epoch, 4), val_accuracy=ev["accuracy"],
                              val_macro_f1=ev["macro_f1"])
                ddp_model.train()
            accelerator.wait_for_everyone()
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total_steps:
            if accelerator.is_main_process:
                named = dict(model.named_parameters())
                save_checkpoint(stage_dir, trainable={n: named[n] for n in trainable_names}, optimizer=optimizer,
                                scheduler=scheduler, state={"step": step + 1, "total_steps": total_steps,
                                                            "prompt": style.name, "label_set": label_set.name})
            accelerator.wait_for_everyone()
            _test_kill_hook(step + 1)
    bar.close()
    if pool:
        pool.shutdown()

    # Stage output: the adapter (LoRA) or full weights, then merge so the next stage starts from them.
    info = {"stage": stage.name, "kind": stage.method, "index": index, "label_set": label_set.name,
            "prompt": style.name, "data": [asdict(s) for s in stage.data], "steps": total_steps}
    if stage.method == "lora":
        info.update(rank=stage.lora.rank, alpha=stage.lora.alpha, adapter=str(stage_dir / "adapter"))
    else:
        info.update(weights=str(stage_dir / "weights"))
    if stage.eval.manifest and accelerator.is_main_process:
        info["final_eval"] = evaluate(model, processor, stage, stage.eval.manifest, stage.eval.splits,
                                      max_samples=stage.eval.max_samples)
        metrics.write(stage=stage.name, step=total_steps, epoch=round(total_steps * global_batch / mixture.per_epoch, 4),
                      val_accuracy=info["final_eval"]["accuracy"], val_macro_f1=info["final_eval"]["macro_f1"])
    if accelerator.is_main_process:
        if stage.method == "lora":
            model.save_pretrained(stage_dir / "adapter", safe_serialization=True)
            extra = {_base_name(n): p.detach().contiguous() for n, p in model.named_parameters()
                     if p.requires_grad and "lora_" not in n}
            if extra:
                from safetensors.torch import save_file

                save_file(extra, stage_dir / "adapter" / EXTRA)
        else:
            from safetensors.torch import save_model as save_safetensors  # handles tied embeddings

            (stage_dir / "weights").mkdir(parents=True, exist_ok=True)
            save_safetensors(model, str(stage_dir / "weights" / "model.safetensors"))
        write_json(stage_dir / "DONE.json", info)
        shutil.rmtree(stage_dir / "checkpoint", ignore_errors=True)
    accelerator.wait_for_everyone()
    metrics.close()
    model = merge_lora(model) if stage.method == "lora" else model
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _test_kill_hook(step: int) -> None:
    """Tests set CERVL_TEST_KILL_AT_STEP to SIGKILL the process right after a checkpoint."""
    at = os.environ.get("CERVL_TEST_KILL_AT_STEP")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class MetricsLog:
    """Append-only CSV of training metrics (flushed per row), optionally mirrored to TensorBoard."""

    FIELDS = ["time", "stage", "step", "epoch", "loss", "lr", "samples_per_s", "val_accuracy", "val_macro_f1"]

    def __init__(self, path: Path, *, enabled: bool, tensorboard: bool):
        self.enabled, self.path, self.tb = enabled, path, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                log.warning("tensorboard requested but not installed (pip install tensorboard); CSV only")

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


# ----------------------------------------------------------------------------------------------
# Final model, reload, evaluation
# ----------------------------------------------------------------------------------------------

def save_final(model, processor, cfg: RunConfig, run_dir: Path, lineage: list[dict]) -> Path:
    """``final/``: merged weights + processor files + cervl.json (prompt, label set, lineage)."""
    last = cfg.stages[-1]
    final = run_dir / "final"
    meta = {"prompt": last.prompt, "label_set": last.label_set, "lineage": lineage, "save": cfg.save,
            "max_length": cfg.max_length, "model": asdict(cfg.model)}
    if cfg.save == "merged":
        tmp = run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, processor, tmp)
        write_json(tmp / RUN_META, meta)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    else:
        final.mkdir(parents=True, exist_ok=True)
        write_json(final / RUN_META, meta)
    return final


def load_run(run_dir: str | Path, *, dtype: str = "fp32"):
    """Load a finished run: returns ``(model, processor, meta)`` with the saved prompt style and label set.

    ``save: merged`` runs load ``final/`` directly; ``save: adapter`` runs rebuild the base and merge
    the stage adapters in lineage order.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / "final" / RUN_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no final/{RUN_META}: is it a finished cervl run?")
    meta = json.loads(meta_path.read_text())
    if meta["save"] == "merged":
        model, processor = load_model(run_dir / "final", dtype=dtype, attn_implementation="sdpa")
        return model, processor, meta
    from peft import PeftModel

    base = meta["lineage"][0]
    model, processor = load_model(base["weights"], dtype=dtype, attn_implementation="sdpa")
    for entry in meta["lineage"][1:]:
        if entry["kind"] == "lora":
            model = merge_lora(PeftModel.from_pretrained(model, entry["adapter"]))
            _load_extra(model, Path(entry["adapter"]))
        else:
            from safetensors.torch import load_model as load_safetensors

            load_safetensors(model, str(Path(entry["weights"]) / "model.safetensors"))
    return model, processor, meta


def evaluate(model, processor, stage: StageConfig, manifest: str, splits: list[str], *, max_samples: int = 0,
             progress: bool = False) -> dict:
    """Accuracy and macro-F1 of constrained scoring on a labelled manifest split."""
    from cervl.metrics import accuracy, confusion_matrix, macro_f1

    label_set, style = get_label_set(stage.label_set), get_prompt_style(stage.prompt)
    samples = load_samples(manifest, splits, label_set)
    if max_samples and len(samples) > max_samples:
        idx = np.random.default_rng(0).choice(len(samples), max_samples, replace=False)
        samples = [samples[i] for i in sorted(idx)]
    was_training = model.training
    probs = score_labels(model, processor, style, label_set, [s.path for s in samples], progress=progress)
    model.train(was_training)
    y_true = np.array([label_set.index_of[s.record.label] for s in samples])
    y_pred = probs.argmax(1)
    return {"manifest": str(manifest), "splits": splits, "n": len(samples), "label_set": label_set.name,
            "accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred, len(label_set)),
            "confusion": confusion_matrix(y_true, y_pred, len(label_set)).tolist()}


__all__ = ["train", "load_run", "evaluate", "run_stage", "DataError"]
