"""Stage-wise training: ``cervl train CONFIG.yaml [key=value ...]``.

A recipe is a list of stages (see :mod:`cervl.train.config`). Between LoRA stages the previous adapter
is merged into the weights and a fresh adapter with the new stage's rank starts (the paper's
r=16 -> r=8). Each stage writes ``stages/NN-name/`` with its adapter (or full weights), metrics
and a ``DONE.json`` marker; a finished stage is never retrained, and an interrupted one resumes
from its last atomic checkpoint. The run folder's names belong to :mod:`cervl.run`.

Reads top to bottom: :func:`train` = checks, setup, stages, final save, held-out evaluation;
:class:`cervl.train.trainer.StageTrainer` = one stage's set-up (:func:`cervl.train.stage_setup.set_up_stage`), steps
and finish, from three parts that each read alone:
its data (:class:`cervl.train.stage_data.StageData`), its levers (:func:`cervl.train.objective.decide_levers`) and
its files (:class:`cervl.train.stage_outputs.StageOutputs`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from cervl.train.config import RunConfig, to_dict
from cervl.evaluate.evaluation import test_report
from cervl.models.loading import (TINY_PRESETS, assert_finite_weights, build_tiny, default_attn_implementation, load_model)
from cervl.predict.predictor import Predictor
from cervl.run import (Layout, RunLock, RunMeta, StageRecord, apply_stage, base_entry, base_weights, check_config,
                       claim_run_dir, remove_checkpoints, save_base, save_final, write_bad_samples, write_lineage,
                       write_test_metrics)
from cervl.train.sharding import (refuse_unmergeable, refuse_unshardable)
from cervl.train.stage_data import check_data
from cervl.train.trainer import StageTrainer, TrainingDiverged  # noqa: F401  (TrainingDiverged: re-exported)

log = logging.getLogger(__name__)


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


__all__ = ["train", "load_base"]
