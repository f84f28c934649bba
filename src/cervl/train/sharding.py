"""Sharded stages: FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun`` or ``accelerate launch``.

cervl shards the model itself, one FSDP unit per decoder layer and per vision block plus the root, so
the same code runs on CPUs (gloo) and GPUs (nccl); an accelerate FSDP config selects it too. The step
users get wrong most often is the merge between LoRA stages: on sharded weights it would fold each
rank's slice, or nothing. :func:`gather_unsharded` all-gathers the full weights on every rank and
rebuilds a plain copy of the model, which is what gets evaluated, saved and merged, and
:func:`check_unsharded` proves it before the merge.

DeepSpeed ZeRO-3 partitions parameters too, behind its own engine; cervl does not gather them for a
merge, so :func:`refuse_unmergeable` stops such a run before step 0 instead of merging silently wrong.
"""

from __future__ import annotations

import logging
import os
import re

import torch

from cervl.core.errors import UserError
from cervl.models.loading import unwrap

log = logging.getLogger(__name__)

_UNIT = re.compile(r"\.(layers|blocks)\.\d+$")  # decoder layers and vision blocks: one FSDP unit each


def wants_sharding(cfg, accelerator) -> bool:
    """``sharding: fsdp`` in the recipe, or an accelerate FSDP config, with more than one process.

    On CPU accelerate ignores its FSDP config (it enables FSDP on accelerators only) and would train
    plain data-parallel; cervl honours the request (``ACCELERATE_USE_FSDP``) with its own FSDP2.
    """
    from accelerate.utils import DistributedType

    asked = (cfg.sharding == "fsdp" or accelerator.distributed_type == DistributedType.FSDP
             or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
    return asked and accelerator.num_processes > 1


def refuse_unmergeable(cfg, accelerator) -> None:
    """Stop before training when the launcher shards parameters in a way cervl cannot merge correctly."""
    from accelerate.utils import DistributedType

    requested = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if requested and accelerator.distributed_type != DistributedType.DEEPSPEED:
        # accelerate (state.py) enables DeepSpeed only `and not cpu`: without a GPU it would silently train
        # plain data-parallel with every weight on every process
        raise UserError("a DeepSpeed config was given (ACCELERATE_USE_DEEPSPEED=true), but accelerate runs DeepSpeed "
                        "on GPUs only and would silently train without it here; on CPU use sharding: fsdp "
                        "(torchrun --nproc_per_node N -m cervl.cli train RECIPE sharding=fsdp)")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    if stage == 3 and any(s.method == "lora" for s in cfg.stages):
        raise UserError("DeepSpeed ZeRO-3 partitions the weights across processes, and merging a LoRA stage needs "
                        "them whole: cervl does not merge under ZeRO-3 (a merge on partitioned weights would be "
                        "silently wrong). Use FSDP instead (configs/accelerate/fsdp-8gpu.yaml, or sharding: fsdp "
                        "with torchrun), which cervl gathers for the merge, or ZeRO-2")


def refuse_unshardable(cfg, accelerator) -> None:
    """Stop before anything is written when a sharded run would train the output head or the embeddings.

    :func:`shard_model` shards the multimodal core only; the LM head stays a plain full parameter. A stage
    that trains the embeddings (``lora.embeddings: full``, or ``method: full``) would give the optimiser a
    sharded embedding beside a plain head: gradient clipping fails on the mix
    (``aten._foreach_norm.Scalar got mixed torch.Tensor and DTensor``), and where they are tied (Qwen2-VL-2B,
    Qwen2.5-VL-3B) re-tying at the end would throw the head's updates away.
    """
    if not wants_sharding(cfg, accelerator):
        return
    for i, st in enumerate(cfg.stages):
        if st.method == "full" or st.lora.embeddings == "full":
            what = "method: full" if st.method == "full" else "lora.embeddings: full"
            raise UserError(f"stage {i} ({st.name!r}) trains the token embeddings and the output head ({what}), which "
                            f"sharding: fsdp does not shard together (the head stays whole, the embeddings are "
                            f"sharded; in tied models they are one matrix). Train that stage without sharding "
                            f"(sharding=none), or with stages.{i}.lora.embeddings=frozen and method: lora")


def shard_model(model):
    """FSDP2 in place: each decoder layer and vision block, then the multimodal core around them.

    The LM head stays outside: cervl's objective computes logits for the answer tokens only, by calling
    the core and then the head, so the core is the module whose forward FSDP hooks. (With tied
    embeddings the head keeps the full, frozen matrix.) Returns ``model``.
    """
    from torch.distributed.fsdp import fully_shard

    from cervl.models.loading import core_and_head

    core, _ = core_and_head(model)
    units = [m for name, m in core.named_modules() if _UNIT.search(name)]
    for m in units:
        fully_shard(m)
    fully_shard(core)
    log.info("sharded the model over %d processes: %d FSDP units inside the core", torch.distributed.get_world_size(),
             len(units))
    return model


def sync_replicated_grads(params, world: int) -> None:
    """Average the gradients of trainable parameters that FSDP does not manage (outside the core)."""
    from torch.distributed.tensor import DTensor

    for p in params:
        if p.grad is not None and not isinstance(p, DTensor):
            torch.distributed.all_reduce(p.grad)  # SUM: gloo has no AVG
            p.grad.div_(world)


class Skeleton:
    """What is needed to rebuild an unsharded copy: the model class, its config, the LoRA config,
    recorded before :func:`shard_model` changes the classes in place."""

    def __init__(self, model):
        base = unwrap(model)
        self.cls, self.config = type(base), base.config
        self.peft_config = getattr(model, "peft_config", {}).get("default")
        self.dtype = next(model.parameters()).dtype
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}


def gather_unsharded(model, skeleton: Skeleton):
    """A plain (unsharded) copy of a sharded model with the full weights, on every rank (collective).

    The parameters come from an all-gathered full state dict; buffers (rotary frequencies) are never
    sharded and are copied over. The copy has the same trainable flags.
    """
    from peft import get_peft_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    device = next(iter(full.values())).device if full else torch.device("cpu")
    with torch.device("meta"):
        plain = skeleton.cls._from_config(skeleton.config, dtype=skeleton.dtype)
        if skeleton.peft_config is not None:
            plain = get_peft_model(plain, skeleton.peft_config)
    plain.load_state_dict(full, strict=True, assign=True)
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        (plain.get_submodule(owner) if owner else plain)._buffers[leaf] = buf.detach().clone().to(device)
    base = unwrap(plain)
    if getattr(base.config, "tie_word_embeddings", False) or getattr(getattr(base.config, "text_config", None),
                                                                     "tie_word_embeddings", False):
        base.tie_weights()
    for n, p in plain.named_parameters():
        p.requires_grad_(n in skeleton.trainable)
    check_unsharded(plain, skeleton)
    return plain


def check_unsharded(model, skeleton: Skeleton) -> int:
    """Every parameter a plain tensor with its full shape, none left on the meta device; returns the
    number of parameters checked (recorded in the stage's ``DONE.json``)."""
    from torch.distributed.tensor import DTensor

    bad = [n for n, p in model.named_parameters()
           if isinstance(p, DTensor) or p.is_meta or tuple(p.shape) != skeleton.shapes.get(n, tuple(p.shape))]
    bad += [n for n, b in model.named_buffers() if b.is_meta]
    if bad:
        raise RuntimeError(f"the merge would see sharded or missing weights: {bad[:5]}")
    return sum(p.numel() for p in model.parameters())
