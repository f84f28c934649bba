"""Saliency maps: how much each region of a face raises each class's probability.

Two methods, over one small scorer interface (:class:`ImageScorer`), so the tests can check the
methods on a hand-built scorer whose answer depends on one region only:

* **occlusion** (exact, model-agnostic): a patch of the model's neutral colour (its normalisation
  mean, i.e. an all-zero input) slides over the face; every occluded copy is re-scored with the
  exact scorer, in batches, and each pixel gets the mean probability drop of the patches covering
  it. Units: probability points.
* **gradient** (cheap): gradient x input of the class's log-probability with respect to the model's
  normalised pixels, one backward pass per class, pooled to the vision patches and resized to the
  face: the first-order estimate of how much replacing each pixel by the zero input lowers the
  class's log-probability. Units: log-probability per pixel (the log, because a confident answer's
  probability gradient vanishes). Cost: one forward plus one backward per class, about 3 scoring
  passes per class.

:class:`VLMScorer` adapts a :class:`~cervl.predict.Predictor` (Qwen-VL) to the interface: it
turns the processor's patch-flattened ``pixel_values`` back into an image tensor and
differentiably forward again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cervl.core.images import load_rgb
from cervl.core.errors import InvalidInput
from cervl.core.registry import lookup

# Occlusion patch and stride in pixels of a 112-px crop; other sizes scale with their shorter side.
PATCH_112, STRIDE_112 = 24, 8


class ImageScorer:
    """What a saliency method needs from a model. Subclasses set ``classes``, ``fill`` and ``patch``."""

    classes: tuple[str, ...] = ()
    fill: tuple[int, int, int] = (128, 128, 128)  # the colour that means "no signal" (all-zero model input)
    patch: int = 1  # the model's own patch size, in tensor pixels (gradient maps are pooled to it)

    def probs(self, images: list[Image.Image]) -> np.ndarray:
        """Class probabilities (N, K)."""
        raise NotImplementedError

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """The model-space input (3, H, W) for one image; its pixels map onto the image's extent."""
        raise NotImplementedError

    def probs_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable class probabilities (B, K) for a batch of same-size inputs (B, 3, H, W)."""
        raise NotImplementedError


class VLMScorer(ImageScorer):
    """A :class:`~cervl.predict.Predictor`'s exact scorer behind the :class:`ImageScorer` interface."""

    def __init__(self, predictor, *, batch_size: int = 64, normalize: str = "sum"):
        from cervl.predict.scoring import LabelScorer

        if predictor.style.answers_with != "label":
            raise InvalidInput(f"explain scores the class name right after the prompt, but the {predictor.style.name!r} "
                               f"prompt answers with action units first; explain a run trained with 'minimal' or "
                               f"'context'")
        self.predictor, self.batch_size = predictor, batch_size
        self.scorer = LabelScorer(predictor.model, predictor.processor, predictor.style, predictor.label_set,
                                  normalize=normalize)
        ip = predictor.processor.image_processor
        self.classes = tuple(predictor.label_set.classes)
        self.fill = tuple(int(round(255 * m)) for m in ip.image_mean)
        self.patch, self.merge, self.temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size

    def probs(self, images):
        from cervl.predict.scoring import tree_mask_attention

        self.predictor.model.eval()
        with tree_mask_attention(self.predictor.model):
            return self.scorer._score_all(images, self.batch_size, False)

    def to_tensor(self, image):
        enc = self.predictor.processor.image_processor([load_rgb(image)], return_tensors="pt")
        _, gh, gw = (int(v) for v in enc["image_grid_thw"][0])
        return self.unpatchify(enc["pixel_values"], gh, gw)

    def unpatchify(self, pixels: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Qwen-VL's flattened patches (gh*gw, C*T*P*P) back to the image (C, gh*P, gw*P) (first frame)."""
        p, m, t = self.patch, self.merge, self.temporal
        x = pixels.reshape(gh // m, gw // m, m, m, 3, t, p, p)[..., 0, :, :]  # (bh, bw, mh, mw, C, py, px)
        return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`unpatchify` (an image repeated over the temporal patch), differentiable."""
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = x.shape[1] // p, x.shape[2] // p
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, py, px)
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
        return x.reshape(gh * gw, 3 * t * p * p)

    def probs_tensor(self, x):
        from cervl.predict.scoring import tree_mask_attention

        s = self.scorer
        b, gh, gw = x.shape[0], x.shape[2] // self.patch, x.shape[3] // self.patch
        row = s.before + [s.image_token] * (gh * gw // self.merge ** 2) + s.after
        ids = torch.tensor([row] * b, device=s.device)
        grid = torch.tensor([[1, gh, gw]] * b, device=s.device)
        pixels = torch.cat([self.patchify(xi) for xi in x]).to(s.device)
        self.predictor.model.eval()
        with tree_mask_attention(self.predictor.model):
            return torch.softmax(s.log_scores(ids, pixels, grid), dim=-1)


@dataclass
class Explanation:
    """One image's maps: ``maps[i]`` (H, W) in the image's pixels is class ``classes[i]``'s."""

    probs: np.ndarray  # (K,) the unoccluded image's class probabilities
    classes: list[int]  # class indices, in the order of ``maps``
    maps: np.ndarray  # (len(classes), H, W), probability points per pixel
    method: str


def _resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) -> (n, H, W) for ``size`` = (W, H), bilinear."""
    if maps.shape[1:] == (size[1], size[0]):
        return maps
    t = torch.from_numpy(maps.astype(np.float32))[None]
    return F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0].numpy()


def occlusion_maps(scorer: ImageScorer, image: Image.Image, *, patch: int | None = None, stride: int | None = None,
                   batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (K,), maps (K, H, W)) for every class at once: the mean probability drop of the
    occluding patches that cover each pixel (a pixel no patch covers gets 0)."""
    image = load_rgb(image)
    w, h = image.size
    scale = min(w, h) / 112
    patch = patch or max(2, round(PATCH_112 * scale))
    stride = stride or max(1, round(STRIDE_112 * scale))
    xs = list(range(0, max(w - patch, 0) + 1, stride))
    ys = list(range(0, max(h - patch, 0) + 1, stride))
    boxes = [(x, y) for y in ys for x in xs]
    base = scorer.probs([image])[0]
    drops = np.zeros((len(boxes), len(base)))
    for start in range(0, len(boxes), batch_size):
        batch = []
        for x, y in boxes[start:start + batch_size]:
            im = image.copy()
            im.paste(scorer.fill, (x, y, x + patch, y + patch))
            batch.append(im)
        drops[start:start + len(batch)] = base - scorer.probs(batch)
    total, cover = np.zeros((len(base), h, w)), np.zeros((h, w))
    for (x, y), d in zip(boxes, drops):
        total[:, y:y + patch, x:x + patch] += d[:, None, None]
        cover[y:y + patch, x:x + patch] += 1
    return base, total / np.maximum(cover, 1)


def gradient_maps(scorer: ImageScorer, images: list[Image.Image], classes=None
                  ) -> tuple[np.ndarray, list[list[int]], list[np.ndarray]]:
    """(probabilities (N, K), classes, per image maps (len(classes[i]), H, W)) by gradient x input.

    ``images`` must share one size (one batch). ``classes``: per image, the class indices to explain
    (default all), or a function of an image's probabilities giving them (one forward pass serves
    both). Each rank j is explained for all images in one backward pass.
    """
    images = [load_rgb(im) for im in images]
    if len({im.size for im in images}) > 1:
        raise InvalidInput("gradient_maps: one batch needs images of one size")
    x = torch.stack([scorer.to_tensor(im) for im in images]).float().requires_grad_(True)
    with torch.enable_grad():
        probs = scorer.probs_tensor(x)
        k = probs.shape[1]
        if callable(classes):
            classes = [classes(p) for p in probs.detach().cpu().numpy()]
        classes = classes or [list(range(k))] * len(images)
        depth = max(len(c) for c in classes)
        per_rank = []
        for j in range(depth):
            idx = torch.tensor([c[min(j, len(c) - 1)] for c in classes], device=probs.device)
            # The log-probability, not the probability: a confident answer (p = 0.97) has a saturated softmax
            # whose probability gradient is ~0 everywhere. Images are independent: one pass serves the batch.
            target = torch.log(probs.gather(1, idx[:, None]).clamp_min(1e-12)).sum()
            (g,) = torch.autograd.grad(target, x, retain_graph=j < depth - 1)
            per_rank.append((g * x.detach()).sum(1))  # (B, H, W): first-order change if the pixel went to zero
    sal = torch.stack(per_rank, 1)  # (B, depth, H, W)
    p = scorer.patch
    if p > 1:  # the model sees patches, not pixels: one value per patch, smoothly resized back
        sal = F.avg_pool2d(sal, p)
        sal = F.interpolate(sal, scale_factor=p, mode="bilinear", align_corners=False)
    out = [_resize_maps(sal[i, :len(c)].detach().cpu().numpy(), images[i].size) for i, c in enumerate(classes)]
    return probs.detach().cpu().numpy(), classes, out


def select_classes(probs: np.ndarray, which, names: tuple[str, ...]) -> list[int]:
    """``top2`` | ``all`` | a list of class names -> class indices (top-2: the two most probable)."""
    if which in ("top2", None):
        return [int(i) for i in np.argsort(-probs)[:2]]
    if which == "all":
        return list(range(len(names)))
    return [names.index(lookup({n: n for n in names}, c, "class")) for c in which]


class Explainer:
    """Maps for many images with one method; ``explain`` keeps input order.

    ``method``: ``occlusion`` or ``gradient``; ``patch``/``stride``: occlusion geometry in pixels
    (default 24/8 on a 112-px crop, scaled with the image).
    """

    METHODS = ("occlusion", "gradient")

    def __init__(self, scorer: ImageScorer, method: str = "occlusion", *, patch: int | None = None,
                 stride: int | None = None, batch_size: int = 64):
        self.method = lookup({m: m for m in self.METHODS}, method, "explain method")
        self.scorer, self.patch, self.stride, self.batch_size = scorer, patch, stride, batch_size

    def explain(self, images: list, classes="top2", *, progress: bool = False) -> list[Explanation]:
        """Maps for ``images``, in order. ``classes``: ``top2``, ``all`` or class names for every image, or one
        such spec per image (a list of lists). The gradient method runs same-size images in batches."""
        images = [load_rgb(im) for im in images]
        per_image = classes if isinstance(classes, list) and classes and isinstance(classes[0], list) else \
            [classes] * len(images)
        out: list[Explanation | None] = [None] * len(images)
        bar = tqdm(total=len(images), desc=f"explain ({self.method})", unit="img", disable=not progress)
        if self.method == "occlusion":
            for i, im in enumerate(images):
                probs, maps = occlusion_maps(self.scorer, im, patch=self.patch, stride=self.stride,
                                             batch_size=self.batch_size)
                idx = select_classes(probs, per_image[i], self.scorer.classes)
                out[i] = Explanation(probs, idx, maps[idx], self.method)
                bar.update(1)
        else:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, im in enumerate(images):
                groups.setdefault(im.size, []).append(i)
            step = max(1, min(self.batch_size, 16))  # a backward pass holds the batch's activations
            for members in groups.values():
                for start in range(0, len(members), step):
                    chunk = members[start:start + step]
                    pick = iter([per_image[i] for i in chunk])
                    probs, idx, maps = gradient_maps(self.scorer, [images[i] for i in chunk],
                                                     lambda p: select_classes(p, next(pick), self.scorer.classes))
                    for j, i in enumerate(chunk):
                        out[i] = Explanation(probs[j], idx[j], maps[j], self.method)
                    bar.update(len(chunk))
        bar.close()
        return out


def reinitialized(predictor, seed: int = 0):
    """A copy of ``predictor`` whose every layer with parameters is re-initialised (Adebayo et al., 2018's
    sanity check: maps that survive this do not depend on what the model learned)."""
    import copy

    from cervl.predict import Predictor

    model = copy.deepcopy(predictor.model)
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter) and module.weight.ndim == 1:
            torch.nn.init.normal_(module.weight, 1.0, 0.1)  # norms without reset_parameters (RMSNorm)
    return Predictor(model, predictor.processor, predictor.style, predictor.label_set)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (resized to the first's shape); NaN for a constant map."""
    b = _resize_maps(b[None], (a.shape[1], a.shape[0]))[0] if b.shape != a.shape else b
    ra, rb = (np.argsort(np.argsort(v.ravel())).astype(float) for v in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


__all__ = ["Explainer", "Explanation", "ImageScorer", "VLMScorer", "gradient_maps", "occlusion_maps",
           "rank_correlation", "reinitialized", "select_classes"]
