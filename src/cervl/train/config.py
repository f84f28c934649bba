"""Typed run configuration: dataclasses loaded from YAML (``safe_load``) with ``key=value`` overrides.

A recipe is a list of stages; each stage is data, not code. Unknown keys are errors that name the
key and suggest the closest valid one. Relative manifest paths resolve against the YAML file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cervl.train.augment import AugmentSpec, check_spec
from cervl.core.errors import ConfigError, UserError  # noqa: F401  (ConfigError: re-exported)
from cervl.core.labels import LabelSet, get_label_set
from cervl.models.prompts import PromptStyle, get_prompt_style
from cervl.core.registry import suggest


@dataclass
class DataSource:
    """One manifest in a stage's training mix. ``weight`` scales how many of its samples an epoch draws."""

    manifest: str
    weight: float = 1.0
    splits: list[str] = field(default_factory=lambda: ["train"])
    # How an epoch draws this source's samples: natural (each once), balanced (every class equally often)
    # or sqrt (class frequency ~ sqrt of its count); balanced/sqrt draw with replacement, per (seed, epoch).
    sampling: str = "natural"


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    vision: str = "frozen"  # frozen | lora | full
    merger: str = "frozen"  # frozen | lora | full
    # Token embeddings (tied to the output head in Qwen-VL): auto = trained by method full, frozen by lora.
    # "full" also trains them in a LoRA stage (needed when the answer words' embeddings were never trained).
    embeddings: str = "auto"  # auto | frozen | full


@dataclass
class EvalSpec:
    manifest: str | None = None
    splits: list[str] = field(default_factory=lambda: ["val"])
    every: int = 0  # evaluate every N optimizer steps (0: only at the end of the stage)
    max_samples: int = 200


@dataclass
class StageConfig:
    name: str
    data: list[DataSource]
    label_set: str
    prompt: str = "context"
    method: str = "lora"  # lora | full
    lora: LoraSpec = field(default_factory=LoraSpec)
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval: EvalSpec = field(default_factory=EvalSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)  # training views only (cervl.train.augment)
    # Resolved once by validate() from label_set and prompt: the objects training, evaluation and
    # saving use, so no consumer looks a name up again. Not part of the YAML or of config.json.
    labels: LabelSet = field(default=None, init=False, repr=False, compare=False)
    style: PromptStyle = field(default=None, init=False, repr=False, compare=False)


@dataclass
class ModelSpec:
    """``name``: a tiny preset (``tiny-qwen2-vl``...), a hub id, or a local folder."""

    name: str = "tiny-qwen2-vl"
    dtype: str | None = None  # bf16 | fp16 | fp32; default: bf16 on a GPU, fp32 on the CPU
    attn_implementation: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    tokenizer: str | None = None  # tiny presets only: a real tokenizer folder instead of the in-process one
    seed: int = 0


@dataclass
class TestSpec:
    """Held-out evaluation after the last stage."""

    manifest: str | None = None
    splits: list[str] = field(default_factory=lambda: ["test"])
    max_samples: int = 0  # 0: all


@dataclass
class RunConfig:
    model: ModelSpec
    stages: list[StageConfig]
    output_dir: str = "runs/run"
    save: str = "merged"  # merged | adapter
    checkpoint_every: int = 50
    log_every: int = 10
    tensorboard: bool = False
    max_length: int = 2048
    # Prepare the next step's batches in a background thread. None = auto: on with a GPU; off on CPU, where
    # the thread competes with the training threads (measured 34 vs 46-52 samples/s on 2 cores).
    prefetch: bool | None = None
    # Decode and encode batches in this many DataLoader worker processes (GPU machines); 0: in-process.
    num_workers: int = 0
    # Drop training/eval images that fail the pre-flight check (listed in RUN/bad_samples.jsonl) instead
    # of stopping before step 0 with the list of bad files.
    skip_bad: bool = False
    # A non-finite loss or gradient: "stop" (an error naming stage, step and lr; the last checkpoint
    # stays valid) or "skip_step" (drop that step's update, count it, go on).
    nan_policy: str = "stop"
    # Training efficiency (cervl.train.objective), all exact: run the prompt before the image once per batch
    # (shared_prefix); keep frozen-vision-tower features for reuse, up to this many MB in memory and
    # beyond that under RUN/vision_cache (0: off); gradient checkpointing (None: on for models > 3B
    # parameters; it turns the shared prefix off, whose cached keys/values it would recompute).
    shared_prefix: bool = True
    # Sort each run of 50 global batches by image size (RAF-DB originals, C-EXPR-DB frames): less padding.
    # A no-op when all images have one size; deterministic, so resume stays exact.
    group_by_length: bool = True
    vision_cache_mb: int = 1024
    gradient_checkpointing: bool | None = None
    # "fsdp": shard each stage with FSDP2 over the launched processes (torchrun / accelerate launch; CPU
    # or GPU); full weights are gathered for every merge. An accelerate FSDP config selects it too.
    sharding: str = "none"
    test: TestSpec = field(default_factory=TestSpec)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with key paths in errors
# ----------------------------------------------------------------------------------------------

def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp, True
    return tp, False


def build(cls, data: Any, path: str = ""):
    """Construct dataclass ``cls`` from nested dicts/lists, checking keys and simple types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key '{where}'" + suggest(str(key), names)
                              + f" (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{where}'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], where)
    return cls(**kwargs)


def _convert(tp, value, where):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"'{where}' must not be null")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is dict and isinstance(value, dict):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"'{where}' expected {getattr(tp, '__name__', tp)}, got {value!r}")


def to_dict(cfg):
    """Plain data of a config (what YAML and config.json hold): resolved objects are left out."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# ----------------------------------------------------------------------------------------------
# YAML + overrides
# ----------------------------------------------------------------------------------------------

def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (``stages.1.lr=1e-4`` indexes lists); value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:  # malformed ("[1,"), or a tag such as !!python/object that safe_load refuses
        first = str(e).splitlines()[0]
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({first})") from None
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key!r}: '{part}' is not an index of a {len(node)}-item list")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key!r}: '{last}' is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply overrides, validate; manifest paths become absolute."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    for o in overrides:
        apply_override(data, o)
    try:
        cfg = build(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = path.resolve().parent
    _resolve_paths(cfg, base)
    validate(cfg, path)
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    def fix(p):
        return p if p is None or Path(p).is_absolute() else str((base / p).resolve())

    for st in cfg.stages:
        for src in st.data:
            src.manifest = fix(src.manifest)
        st.eval.manifest = fix(st.eval.manifest)
        if st.augment.align_noise is not None:
            st.augment.align_noise.file = fix(st.augment.align_noise.file)
    cfg.test.manifest = fix(cfg.test.manifest)


def validate(cfg: RunConfig, source: Path | str = "config") -> None:
    """Check values that types alone cannot, before anything is loaded or written; resolve each stage's
    label set and prompt style into ``stage.labels`` / ``stage.style``."""
    if not cfg.stages:
        raise ConfigError(f"{source}: 'stages' is empty")
    _check_run_values(cfg, source)
    names = set()
    for i, st in enumerate(cfg.stages):
        where = f"{source}: stages[{i}] ({st.name})"
        if st.name in names:
            raise ConfigError(f"{where}: duplicate stage name")
        names.add(st.name)
        for key, value, choices in (("method", st.method, ("lora", "full")),
                                    ("schedule", st.schedule, ("cosine", "linear", "constant")),
                                    ("lora.vision", st.lora.vision, ("frozen", "lora", "full")),
                                    ("lora.merger", st.lora.merger, ("frozen", "lora", "full")),
                                    ("lora.embeddings", st.lora.embeddings, ("auto", "frozen", "full"))):
            if value not in choices:
                raise ConfigError(f"{where}: '{key}' must be one of {choices}, got {value!r}")
        try:
            st.labels, st.style = get_label_set(st.label_set), get_prompt_style(st.prompt)
        except UserError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not st.data:
            raise ConfigError(f"{where}: 'data' lists no manifests")
        _check_stage_values(st, where)


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _check_run_values(cfg: RunConfig, source) -> None:
    where = str(source)
    _check(cfg.save in ("merged", "adapter"), where, f"'save' must be merged or adapter, got {cfg.save!r}")
    _check(cfg.model.dtype in (None, "bf16", "fp16", "fp32"), where,
           f"'model.dtype' must be bf16, fp16 or fp32, got {cfg.model.dtype!r}")
    _check(cfg.log_every >= 1, where, f"'log_every' must be >= 1, got {cfg.log_every}")
    _check(cfg.checkpoint_every >= 0, where, f"'checkpoint_every' must be >= 0 (0: no checkpoints), got "
           f"{cfg.checkpoint_every}")
    _check(cfg.max_length >= 1, where, f"'max_length' must be >= 1, got {cfg.max_length}")
    _check(cfg.nan_policy in ("stop", "skip_step"), where, f"'nan_policy' must be stop or skip_step, got "
           f"{cfg.nan_policy!r}")
    _check(cfg.test.max_samples >= 0, where, "'test.max_samples' must be >= 0")
    _check(cfg.vision_cache_mb >= 0, where, "'vision_cache_mb' must be >= 0")
    _check(cfg.num_workers >= 0, where, "'num_workers' must be >= 0")
    _check(cfg.sharding in ("none", "fsdp"), where, f"'sharding' must be none or fsdp, got {cfg.sharding!r}")


def _check_stage_values(st: StageConfig, where: str) -> None:
    _check(st.batch_size >= 1 and st.grad_accum >= 1, where, "'batch_size' and 'grad_accum' must be >= 1")
    _check(_finite(st.lr) and st.lr > 0, where, f"'lr' must be a finite number > 0, got {st.lr}")
    _check(_finite(st.epochs) and st.max_steps >= 0 and (st.epochs > 0 or st.max_steps > 0), where,
           f"'epochs' must be finite and > 0 (or max_steps > 0), got epochs={st.epochs}, max_steps={st.max_steps}")
    _check(st.warmup_steps >= 0, where, "'warmup_steps' must be >= 0")
    _check(_finite(st.weight_decay) and st.weight_decay >= 0, where, "'weight_decay' must be finite and >= 0")
    _check(_finite(st.max_grad_norm) and st.max_grad_norm >= 0, where, "'max_grad_norm' must be finite and >= 0")
    _check(st.eval.every >= 0 and st.eval.max_samples >= 0, where, "'eval.every' and 'eval.max_samples' must be >= 0")
    for j, src in enumerate(st.data):
        _check(_finite(src.weight) and src.weight > 0, where, f"'data[{j}].weight' must be finite and > 0")
        _check(src.sampling in ("natural", "balanced", "sqrt"), where,
               f"'data[{j}].sampling' must be natural, balanced or sqrt, got {src.sampling!r}"
               + suggest(src.sampling, ("natural", "balanced", "sqrt")))
    check_spec(st.augment, where)
    if st.method == "lora":
        _check(st.lora.rank >= 1, where, "'lora.rank' must be >= 1")
        _check(_finite(st.lora.alpha) and st.lora.alpha > 0, where, "'lora.alpha' must be finite and > 0")
        _check(0 <= st.lora.dropout < 1, where, "'lora.dropout' must be in [0, 1)")
