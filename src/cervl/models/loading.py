"""Model loading, tiny Qwen-VL presets, the image-only processor, and LoRA helpers.

Families are picked from the config's ``model_type`` (never from a name string):

==============  ======================================  ==========
model_type      model class                             patch size
==============  ======================================  ==========
qwen2_vl        Qwen2VLForConditionalGeneration         14
qwen2_5_vl      Qwen2_5_VLForConditionalGeneration      14
qwen3_vl        Qwen3VLForConditionalGeneration         16
==============  ======================================  ==========

transformers 5.x Qwen-VL processors also want a video processor, which needs torchvision. The
:func:`image_only_processor` subclass drops it and uses the PIL image processor, so cervl runs
without torchvision; with torchvision installed the stock processor is used.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cervl.core.errors import InputNotFound, InvalidInput
from cervl.core.registry import lookup

# The tiny pretrained base that ships inside the package (``cervl pretrain-tiny`` rebuilds it).
TINY_BASE = Path(__file__).parents[1] / "assets" / "tiny-base"

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# A ChatML template in the Qwen-VL format, written for the tiny tokenizer (real models bring their own).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    model_type: str
    config_class: str
    model_class: str
    processor_class: str
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", 14,
               _CLIP_MEAN, _CLIP_STD),
        Family("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", 14,
               _CLIP_MEAN, _CLIP_STD),
        Family("qwen3_vl", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", 16,
               (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )
}


def get_family(model_type: str) -> Family:
    """The Qwen-VL family for a config's ``model_type``."""
    return lookup(FAMILIES, model_type, "model_type")  # Qwen-VL families only; never remote code


def _transformers_attr(name: str):
    import transformers

    return getattr(transformers, name)


def has_torchvision() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:  # PyPI's torchvision can be installed yet fail to import beside a mismatched torch
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


_IMAGE_ONLY: dict[str, type] = {}


def image_only_processor(family: Family, image_processor, tokenizer, chat_template: str | None = None):
    """The family's processor without its video processor (no torchvision needed)."""
    if family.processor_class not in _IMAGE_ONLY:
        base = _transformers_attr(family.processor_class)

        class ImageOnlyProcessor(base):
            # ProcessorMixin derives its sub-processors from this signature: no video_processor here.
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
        _IMAGE_ONLY[family.processor_class] = ImageOnlyProcessor
    return _IMAGE_ONLY[family.processor_class](image_processor, tokenizer, chat_template=chat_template)


def make_image_processor(family: Family, min_pixels: int, max_pixels: int, **overrides):
    return Qwen2VLImageProcessorPil(
        patch_size=overrides.get("patch_size", family.patch_size), merge_size=2, temporal_patch_size=2,
        min_pixels=min_pixels, max_pixels=max_pixels, image_mean=list(overrides.get("image_mean", family.image_mean)),
        image_std=list(overrides.get("image_std", family.image_std)))


# ----------------------------------------------------------------------------------------------
# Tiny presets
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a tiny random-init Qwen-VL (for tests and the offline demo)."""

    model_type: str
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    vision_dim: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    patch_size: int = 8
    image_size: int = 112
    vocab_size: int = 1024
    deepstack: tuple[int, ...] = ()  # Qwen3-VL: vision blocks whose features are added to early LM layers


TINY_PRESETS: dict[str, TinySpec] = {
    "tiny-qwen2-vl": TinySpec("qwen2_vl"),
    "tiny-qwen2.5-vl": TinySpec("qwen2_5_vl"),
    "tiny-qwen3-vl": TinySpec("qwen3_vl"),
}


def tiny_config(spec: TinySpec, tokenizer) -> "transformers.PretrainedConfig":  # noqa: F821
    """A transformers config of the tiny shape, with the tokenizer's special-token ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = max(len(tokenizer), spec.vocab_size)
    head_dim = spec.hidden // spec.heads
    # M-RoPE splits head_dim/2 rotary frequencies over (t, h, w).
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope})
    if spec.model_type == "qwen2_vl":
        vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_dim, hidden_size=spec.hidden, mlp_ratio=2,
                      num_heads=spec.vision_heads, patch_size=spec.patch_size, spatial_merge_size=2,
                      temporal_patch_size=2)
    elif spec.model_type == "qwen2_5_vl":
        vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_dim, out_hidden_size=spec.hidden,
                      intermediate_size=2 * spec.vision_dim, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=spec.image_size,
                      fullatt_block_indexes=list(range(spec.vision_depth)))
    else:
        text.update(head_dim=head_dim, attention_bias=False)
        rope = text["rope_parameters"]
        rope["mrope_interleaved"] = True
        vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_dim, out_hidden_size=spec.hidden,
                      intermediate_size=2 * spec.vision_dim, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                      spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=(spec.image_size // spec.patch_size) ** 2,
                      deepstack_visual_indexes=list(spec.deepstack))
    config_cls = _transformers_attr(get_family(spec.model_type).config_class)
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    return cfg


def train_tokenizer(corpus: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on ``corpus`` (deterministic, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


TOKENIZER_STYLES = ("minimal", "context", "au-describe")  # the styles the shipped base's tokenizer was built from


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt style for every label set, and AU captions."""
    from cervl.core.facs import AUS
    from cervl.core.labels import ALL_CLASSES, LABEL_SETS
    from cervl.models.prompts import PROMPT_STYLES

    texts = []
    # The vocabulary is frozen with the shipped tiny base (its token ids are in its weights): styles added
    # since (au-caption's "then name its expression" wording) tokenize through the byte-level fallback.
    for style in (s for s in PROMPT_STYLES.values() if s.name in TOKENIZER_STYLES):
        for ls in LABEL_SETS.values():
            texts.extend(style.corpus(ls))
    texts += [f"{c}" for c in ALL_CLASSES] * 20
    texts += [d for _, d in AUS.values()] * 20
    return texts


def build_tiny(preset: str, *, tokenizer_path: str | os.PathLike | None = None, seed: int = 0,
               image_size: int | None = None, **spec_overrides):
    """Build a tiny preset with random weights: returns ``(model, processor)``; no download.

    ``tokenizer_path`` takes a real tokenizer (e.g. ``../shared/qwen2-vl-tokenizer``) instead of the
    in-process one; the vocabulary then grows to fit it.
    """
    spec = lookup(TINY_PRESETS, preset, "tiny preset")
    if spec_overrides or image_size:
        spec = TinySpec(**{**asdict(spec), **spec_overrides, **({"image_size": image_size} if image_size else {})})
    family = get_family(spec.model_type)
    if tokenizer_path:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
        tokenizer.padding_side = "left"
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(), spec.vocab_size)
    cfg = tiny_config(spec, tokenizer)
    torch.manual_seed(seed)
    model_cls = _transformers_attr(family.model_class)
    model = model_cls(cfg)
    pixels = spec.image_size * spec.image_size
    image_processor = make_image_processor(family, pixels, pixels, patch_size=spec.patch_size)
    processor = make_processor(family, image_processor, tokenizer)
    return model, processor


def make_processor(family: Family, image_processor, tokenizer):
    chat_template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    if tokenizer.chat_template is None:
        tokenizer.chat_template = chat_template
    return image_only_processor(family, image_processor, tokenizer, chat_template)


# ----------------------------------------------------------------------------------------------
# Loading and saving real models
# ----------------------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``bf16 | fp16 | fp32``; warns once when a half type would run slowly on this CPU."""
    dtype = lookup(DTYPES, name, "dtype")
    if dtype != torch.float32 and not torch.cuda.is_available() and not cpu_has_native(name):
        _warn_slow_half(name)
    return dtype


# CPU features that give native bf16 / fp16 matrix products (oneDNN uses them); without them torch emulates
NATIVE_HALF_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (``/proc/cpuinfo``; empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(f for line in text.splitlines() if line.startswith(("flags", "Features"))
                     for f in line.split(":", 1)[1].split())


# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) that keep native bf16 / fp16 matrix products
_ONEDNN_HALF = {"bf16": ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10"),
                "fp16": ("AVX512_CORE_FP16", "AVX512_CORE_AMX_FP16", "AVX10")}


def cpu_has_native(name: str) -> bool:
    """Whether this CPU computes ``name`` (bf16 or fp16) natively; True where the flags cannot be read
    (other systems: no warning rather than a wrong one). ``ONEDNN_MAX_CPU_ISA`` below the needed
    instructions (e.g. ``AVX2``) turns them off as the hardware's absence would."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa not in ("ALL", "DEFAULT") and not isa.startswith(_ONEDNN_HALF.get(name, ())):
        return False
    flags = cpu_flags()
    return not flags or any(f in flags for f in NATIVE_HALF_FLAGS.get(name, ()))


@functools.lru_cache(maxsize=None)
def _warn_slow_half(name: str) -> None:
    log.warning("%s on this CPU (torch capability %s, no %s): torch emulates %s matrix products, measured up to "
                "400x slower than fp32 on an AVX2-only CPU (0.28 against 112 GFLOP/s for a 2048x2048 product); "
                "use model.dtype=fp32 on this machine", name, torch.backends.cpu.get_cpu_capability(),
                " or ".join(NATIVE_HALF_FLAGS[name]), name)


def default_dtype() -> str:
    """bf16 on a GPU, fp32 on the CPU: the one default of every loader."""
    return "bf16" if torch.cuda.is_available() else "fp32"


def default_attn_implementation() -> str:
    """flash_attention_2 when installed (and a GPU is present), else PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(name_or_path: str | os.PathLike, *, dtype: str | None = None, attn_implementation: str | None = None,
               min_pixels: int | None = None, max_pixels: int | None = None, device_map=None):
    """Load a Qwen-VL model and its processor from a hub id or local folder (safetensors only).

    The class comes from ``config.model_type``; ``min_pixels``/``max_pixels`` set the image-token
    budget and are saved with the processor so training and inference use the same values.
    """
    if str(name_or_path) in TINY_PRESETS:
        raise InvalidInput(f"{name_or_path!r} is a tiny preset: build it with build_tiny()")
    local_config = Path(name_or_path) / "config.json"
    if local_config.is_file():  # check the family before transformers sees the folder (custom code, auto_map)
        import json

        try:
            model_type = json.loads(local_config.read_text()).get("model_type")
        except ValueError as e:
            raise InvalidInput(f"{local_config}: not valid JSON ({e})") from None
        get_family(str(model_type))
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except ValueError as e:  # an unknown model_type (or auto_map custom code): never run remote code
        raise InvalidInput(f"cannot load model {str(name_or_path)!r}: {str(e).splitlines()[0]} "
                           f"(cervl loads Qwen-VL families only, with trust_remote_code=False)") from None
    except OSError as e:  # no such folder, and the hub id cannot be fetched (offline, typo, gated)
        raise InputNotFound(f"cannot load model {str(name_or_path)!r}: not a local folder with config.json and "
                                f"not fetchable from the Hugging Face hub ({str(e).splitlines()[0]})") from None
    family = get_family(config.model_type)
    model_cls = _transformers_attr(family.model_class)
    model = model_cls.from_pretrained(name_or_path, dtype=resolve_dtype(dtype or default_dtype()), use_safetensors=True,
                                      trust_remote_code=False,
                                      attn_implementation=attn_implementation or default_attn_implementation(),
                                      device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path, trust_remote_code=False)
    if min_pixels is not None or max_pixels is not None:
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        image_processor.size = size
    if has_torchvision():
        processor_cls = _transformers_attr(family.processor_class)
        from transformers import AutoVideoProcessor

        processor = processor_cls(image_processor, tokenizer,
                                  AutoVideoProcessor.from_pretrained(name_or_path, trust_remote_code=False),
                                  chat_template=tokenizer.chat_template)
    else:
        processor = make_processor(family, image_processor, tokenizer)
    return model, processor


def save_model(model, processor, out: str | os.PathLike) -> None:
    """Save weights as safetensors plus tokenizer, image-processor and chat-template files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2")


def lora_target_regex(lm_targets=LM_TARGETS, vision: str = "frozen", merger: str = "frozen") -> str:
    """A peft ``target_modules`` regex: LM projections, plus vision blocks / merger when set to lora."""
    parts = [rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(lm_targets)})"]
    if vision == "lora":
        parts.append(rf".*visual\.blocks\.\d+\.(attn|mlp)\.({'|'.join(VISION_TARGETS)})")
    if merger == "lora":
        parts.append(r".*visual\.merger\.(mlp\.\d+|linear_fc\d)")
    return "(" + "|".join(parts) + ")$"


def apply_lora(model, *, rank: int, alpha: float, dropout: float, target_regex: str):
    """Wrap ``model`` with a fresh LoRA adapter (peft); only adapter weights are trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex, bias="none")
    return get_peft_model(model, cfg)


def merge_lora(model):
    """Fold a peft adapter into the base weights and return the plain model."""
    return model.merge_and_unload()


def unwrap(model):
    """The transformers model under any peft wrapper (the one place that knows peft's nesting)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def core_and_head(model):
    """The transformers multimodal core (``.model``: vision tower, merger, language model, ``get_rope_index``)
    and the LM head, under any peft wrapper."""
    base = unwrap(model)
    return base.model, base.lm_head


def cache_kwargs(cache) -> dict:
    """The keyword that passes a KV cache to a Qwen-VL forward: ``cache`` from transformers 5.2x,
    ``past_key_values`` before (the GPU image of ``benchmarks/gpu.py`` has 5.17). An unknown keyword would
    be swallowed by ``**kwargs`` and the cache silently ignored, so the name is looked up, not guessed."""
    return {_CACHE_KW: cache}


def _forward_parameters() -> set[str]:
    import inspect

    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    return set(inspect.signature(Qwen2VLModel.forward).parameters)


_FORWARD = _forward_parameters()
_CACHE_KW = "cache" if "cache" in _FORWARD else "past_key_values"
# Precomputed image features (``mm_encoder_outputs``) are accepted from transformers 5.2x on; before, the
# keyword would be swallowed by **kwargs and the image silently left out (see AnswerObjective).
ACCEPTS_ENCODER_OUTPUTS = "mm_encoder_outputs" in _FORWARD


def assert_finite_weights(model, what: str) -> None:
    """Refuse to save a model with NaN/inf weights (a diverged run must not become a usable model)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise InvalidInput(f"{what} has {len(bad)} non-finite weight tensors (e.g. {bad[0]}); it is not saved")
