"""A training stage's data: its samples, the mixture that orders them, and this process's micro-batches of
every step.

:meth:`StageData.prepare` is a pure function of the step number. That is what makes a resume after
``kill -9`` exact, and what lets the next step be prepared in a background thread or in DataLoader worker
processes with identical results (:meth:`StageData.batches`). Whether images are hashed (for the vision
cache) is decided by the stage's levers before the data is built (:mod:`cervl.train.objective`), so this
module never looks at the loss module's state.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cervl.train.augment import Augmenter
from cervl.train.config import RunConfig, StageConfig
from cervl.core.images import check_images, file_hash, image_size, load_rgb
from cervl.data.mixture import Mixture, Sample, load_samples
from cervl.models.encode import collate, encode_sample, pad_id, prompt_text
from cervl.core.errors import UserError

log = logging.getLogger(__name__)


def source_samples(stage: StageConfig, src, bad: set) -> list[Sample]:
    """One data source's training samples, minus the known-bad images."""
    answers = stage.style.answers_with  # "label", "aus" (au-describe) or "aus+label" (au-caption)
    return [s for s in load_samples(src.manifest, src.splits, stage.labels, need_aus=answers != "label",
                                    need_labels=answers != "aus") if str(s.path) not in bad]


def stage_samples(stage: StageConfig, bad: set) -> list[Sample]:
    """Every training sample of a stage (all sources), minus the known-bad images."""
    return [s for src in stage.data for s in source_samples(stage, src, bad)]


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


class StageData:
    """The samples of one stage and this process's share of every step's micro-batches.

    ``world``/``rank``: the processes of a data-parallel run; each takes its slice of the global batch.
    ``prompt``: the stage's rendered prompt (rendered here when not given); ``hash_images``: attach each
    image's content hash to its batch (the vision cache's key).
    """

    def __init__(self, processor, cfg: RunConfig, stage: StageConfig, bad: set, *, world: int, rank: int,
                 image_token_id: int | None, prompt: str | None = None, hash_images: bool = False):
        self.processor, self.cfg, self.stage, self.world, self.rank = processor, cfg, stage, world, rank
        self.global_batch = stage.batch_size * stage.grad_accum * world
        self.mixture = Mixture([(source_samples(stage, src, bad), src.weight, src.sampling) for src in stage.data],
                               seed=stage.seed, group=50 * self.global_batch if cfg.group_by_length else 0,
                               length=lambda s: math.prod(image_size(s.path)))
        self.total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * self.mixture.per_epoch / self.global_batch))
        self.prompt = prompt or prompt_text(processor, stage.style, stage.labels)  # rendered once per stage
        self.pad_id, self.image_token_id = pad_id(processor.tokenizer), image_token_id
        self.hash_images, self.hashes = hash_images, {}
        # Training views (cervl.train.augment): a pure function of (seed, epoch, position), like the batches.
        self.augmenter = Augmenter(stage.augment, stage.seed) if stage.augment.active() else None

    def view(self, position: int, sample: Sample):
        """The training image at ``position`` of the sample stream, augmented, and its vision-cache hash
        (None: a fresh augmented view, never cached)."""
        image = load_rgb(sample.path)
        if self.augmenter is None:
            return image, (self._hash(sample.path) if self.hash_images else None)
        epoch, index = divmod(position, self.mixture.per_epoch)
        key = self.augmenter.key(str(sample.path), epoch, index)
        # landmarks in the pixels of the image just opened (cervl align stores the photo's: Record maps them)
        landmarks = sample.record.landmarks_for_image(image.size) if self.augmenter.uses_landmarks else None
        image = self.augmenter(image, key, landmarks)
        tag = self.augmenter.cache_tag(key)
        return image, (f"{self._hash(sample.path)}:{tag}" if self.hash_images and tag else None)

    def drawn_counts(self) -> dict[str, int]:
        """How many training draws of each class the stage's steps make (what ``sampling`` actually did)."""
        counts: dict[str, int] = {}
        for s in self.mixture.take(0, self.total_steps * self.global_batch):
            counts[str(s.record.label)] = counts.get(str(s.record.label), 0) + 1
        return dict(sorted(counts.items()))

    def augment_preview(self, path, n: int = 16) -> None:
        """``stages/NN/augment.png``: the first ``n`` training views of the stage, as the model sees them."""
        from cervl.train.augment import augment_grid

        samples = self.mixture.take(0, n)
        images = [self.view(i, s)[0] for i, s in enumerate(samples)]
        augment_grid(images, path, title=f"stage {self.stage.name}: the first {n} training views (augment on)")

    def epoch(self, step: int) -> float:
        """Epochs done after ``step`` steps."""
        return round(step * self.global_batch / self.mixture.per_epoch, 4)

    def prepare(self, step: int) -> list[dict]:
        """This process's share of every micro-batch of ``step`` (a pure function of the step number)."""
        stage = self.stage
        # stream position of this process's first sample in each micro-batch (augmented views are keyed by it)
        firsts = [step * self.global_batch + a * stage.batch_size * self.world + self.rank * stage.batch_size
                  for a in range(stage.grad_accum)]
        micro = [self.mixture.take(first, stage.batch_size) for first in firsts]
        views = [[self.view(first + j, s) for j, s in enumerate(mb)] for first, mb in zip(firsts, micro)]
        encoded = [[encode_sample(self.processor, self.prompt, image, stage.style.answer(s.record.label, s.record.aus),
                                  max_length=self.cfg.max_length, sample_name=s.name)
                    for s, (image, _) in zip(mb, vs)] for mb, vs in zip(micro, views)]
        batches = [collate(e, self.pad_id, self.image_token_id) for e in encoded]
        if self.hash_images:
            for batch, vs in zip(batches, views):
                batch["image_hashes"] = [h for _, h in vs]
        return batches

    def _hash(self, path) -> str:
        h = self.hashes.get(path)
        if h is None:
            h = self.hashes[path] = file_hash(path)
        return h

    def batches(self, start: int, *, prefetch: bool):
        """Every remaining step's micro-batches, in order: from ``num_workers`` DataLoader processes, one
        background thread (``prefetch``), or inline. All three give the same batches."""
        steps = range(start, self.total_steps)
        if self.cfg.num_workers > 0:
            loader = torch.utils.data.DataLoader(_Steps(self.prepare, self.total_steps), batch_size=None,
                                                 sampler=steps, num_workers=self.cfg.num_workers,
                                                 collate_fn=_identity, prefetch_factor=2,
                                                 # its own generator: seeding the workers must not advance the
                                                 # global RNG, which drives dropout (results stay identical)
                                                 generator=torch.Generator().manual_seed(0))
            yield from loader
        elif prefetch:  # one background thread prepares step t+1 while step t trains
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


__all__ = ["StageData", "check_data", "source_samples", "stage_samples"]
