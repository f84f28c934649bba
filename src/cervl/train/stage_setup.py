"""A stage's set-up, apart from its loop: trainable weights, sharding, the levers, data, optimiser and
schedule, resume, and the objective, in the order each depends on the last (:func:`set_up_stage`).

:class:`cervl.train.trainer.StageTrainer` runs the steps on what this returns.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cervl.models.encode import prompt_text
from cervl.models.loading import apply_lora, lora_target_regex
from cervl.run import Layout, StageFiles
from cervl.train.config import RunConfig, StageConfig, to_dict
from cervl.train.objective import decide_levers
from cervl.train.sharding import Skeleton, shard_model, wants_sharding
from cervl.train.stage_data import StageData
from cervl.train.stage_outputs import StageOutputs

log = logging.getLogger(__name__)


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


@dataclass
class StageSetup:
    """Everything a stage's loop needs, built once by :func:`set_up_stage`."""

    data: Any = None
    ddp_model: Any = None
    global_batch: Any = None
    levers: Any = None
    model: Any = None
    objective: Any = None
    optimizer: Any = None
    outputs: Any = None
    params: Any = None
    rank: Any = None
    scheduler: Any = None
    sharded: Any = None
    skeleton: Any = None
    start_step: Any = None
    total_steps: Any = None
    trainable_names: Any = None
    world: Any = None


def set_up_stage(model, processor, cfg: RunConfig, index: int, stage: StageConfig, run_dir: Path, acc, bad: set,
                 files: StageFiles, *, main: bool, vision_memory: dict) -> StageSetup:
    """Data, trainable weights, sharding, optimiser, resume and levers for stage ``index`` of ``cfg``."""
    s = StageSetup(model=model)
    s.world, s.rank = acc.num_processes, acc.process_index
    s.model = prepare_trainable(s.model, stage)
    if s.rank:  # each process its own dropout stream (rank 0 keeps the one-process stream)
        torch.manual_seed(stage.seed * 1009 + s.rank)
    s.sharded = wants_sharding(cfg, acc)
    if s.sharded:  # FSDP2 in place; the skeleton lets finish() rebuild full weights for the merge
        s.skeleton = Skeleton(s.model)
        shard_model(s.model)
        if main and (cfg.checkpoint_every or stage.eval.every):
            log.warning("sharding: fsdp writes no mid-stage checkpoints and runs no mid-stage evaluation; "
                        "stage %s is checkpointed when it ends (an interrupted stage restarts)", stage.name)
    # the levers first: whether images are hashed (vision cache) is part of what the data layer produces
    prompt = prompt_text(processor, stage.style, stage.labels)  # rendered once per stage
    s.levers = decide_levers(s.model, processor, cfg, stage, prompt, sharded=s.sharded,
                                cache_dir=Layout(run_dir).vision_cache, memory=vision_memory)
    s.data = StageData(processor, cfg, stage, bad, world=s.world, rank=s.rank,
                          image_token_id=getattr(s.model.config, "image_token_id", None), prompt=prompt,
                          hash_images=s.levers.vision_cache is not None)
    s.total_steps, s.global_batch = s.data.total_steps, s.data.global_batch
    s.params = [p for p in s.model.parameters() if p.requires_grad]
    s.trainable_names = [n for n, p in s.model.named_parameters() if p.requires_grad]
    s.optimizer = torch.optim.AdamW(s.params, lr=stage.lr, weight_decay=stage.weight_decay)
    s.scheduler = make_scheduler(s.optimizer, stage, s.total_steps)
    s.outputs = StageOutputs(files, main=main)
    s.start_step = s.outputs.resume(s.model, s.optimizer, s.scheduler, rank=s.rank,
                                          expected={"total_steps": s.total_steps, "prompt": stage.style.name,
                                                    "label_set": stage.labels.name})
    s.outputs.start({"index": index, **to_dict(stage), "total_steps": s.total_steps,
                        "samples_per_epoch": s.data.mixture.per_epoch, "world_size": s.world},
                       resume_step=s.start_step, tensorboard=cfg.tensorboard)
    if s.data.augmenter is not None and main:  # what the model sees, before it trains on it
        s.data.augment_preview(files.augment_preview)
    s.objective = s.levers.objective(s.model)
    if s.sharded:  # FSDP2 reduces the gradients itself: no DDP wrapper on top
        s.ddp_model = s.objective
    else:
        s.ddp_model, s.optimizer = acc.prepare(s.objective, s.optimizer)
    return s
