"""Turning (image, prompt style, label set, answer) into model inputs with an exact loss mask.

The prompt is tokenised alone (exactly as at inference) and the answer tokens plus the
end-of-turn token are appended, so the mask boundary never depends on how a tokenizer merges
across it. Samples are never truncated: one longer than ``max_length`` is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from cervl.core.errors import InvalidInput
from cervl.core.labels import LabelSet
from cervl.models.prompts import PromptStyle

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # (1, 3)


class SampleTooLong(InvalidInput):
    """A sample longer than ``max_length`` (samples are never truncated)."""


def prompt_text(processor, style: PromptStyle, label_set: LabelSet) -> str:
    """The chat-formatted prompt (ending with the assistant turn header) for a style and label set.

    Rendering the chat template costs milliseconds: callers render it once (per stage, per scorer)
    and pass the text on.
    """
    return processor.tokenizer.apply_chat_template(style.messages(label_set), tokenize=False,
                                                   add_generation_prompt=True)


def shared_prefix(tokenizer, text: str) -> list[int]:
    """The prompt's tokens before its image (system text, guidelines, definitions): identical for every
    sample of a stage, so training and scoring compute them once per batch."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[: ids.index(tokenizer.convert_tokens_to_ids("<|vision_start|>"))]


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's own, else 0 (padded positions are masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Answer tokens followed by the end-of-turn token (the supervised part of a sample)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]


def encode_prompt(processor, text: str, image: Image.Image) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    out = processor(text=[text], images=[image], return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"], out["image_grid_thw"]


def encode_sample(processor, prompt: str, image: Image.Image, answer: str | None, *, max_length: int,
                  sample_name: str = "sample") -> Encoded:
    """Encode one training/eval sample (``prompt`` from :func:`prompt_text`); labels are IGNORE
    everywhere except answer + end-of-turn."""
    ids, pixels, grid = encode_prompt(processor, prompt, image)
    labels = [IGNORE] * len(ids)
    if answer is not None:
        ans = answer_ids(processor.tokenizer, answer)
        ids, labels = ids + ans, labels + ans
    if len(ids) > max_length:
        raise SampleTooLong(f"{sample_name}: {len(ids)} tokens (prompt + image + answer) exceed max_length="
                            f"{max_length}; samples are never truncated: raise max_length or lower max_pixels")
    return Encoded(ids, labels, pixels, grid)


def collate(encoded: list[Encoded], pad_id: int, image_token_id: int, *, padding_side: str = "right"
            ) -> dict[str, torch.Tensor]:
    """Pad a list of samples into a batch (pads get attention 0 and label IGNORE).

    Left padding puts every answer at the end, so scoring can keep only the last logits.
    """
    n = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, e in enumerate(encoded):
        span = slice(0, len(e.input_ids)) if padding_side == "right" else slice(n - len(e.input_ids), n)
        ids[i, span] = torch.tensor(e.input_ids)
        labels[i, span] = torch.tensor(e.labels)
        mask[i, span] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "mm_token_type_ids": (ids == image_token_id).long() * mask,
        "pixel_values": torch.cat([e.pixel_values for e in encoded]),
        "image_grid_thw": torch.cat([e.image_grid_thw for e in encoded]),
    }


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position log-probability of the next label token (IGNORE positions give 0), shape (B, T-1)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE
    logp = torch.log_softmax(shift_logits, dim=-1)
    picked = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * valid
