"""Face detectors returning a box, a score and five landmarks per face.

``DETECTORS`` is the registry; :func:`make_detector` the factory.

* ``mtcnn`` (default, offline): MTCNN (Zhang et al. 2016) re-implemented here in PyTorch, with the
  P/R/O-Net weights that ship inside the ``facenet-pytorch`` wheel on PyPI (MIT). Only the weight
  files are used (loaded with ``torch.load(weights_only=True)``: tensors only, no unpickling of
  code); the package itself is never imported, so its old torch/numpy/torchvision pins do not
  matter. Install it with ``pip install --no-deps facenet-pytorch==2.6.0`` (the Makefile does).
* ``yunet`` (optional, needs a one-time download of ``face_detection_yunet_2023mar.onnx``):
  OpenCV's ``FaceDetectorYN``; pass ``model_path``.

Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth corner
("left" = image left), in pixel coordinates of the input image.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


@dataclass
class Face:
    box: np.ndarray  # x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2)

    @property
    def area(self) -> float:
        return float(max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1]))


class FaceDetector:
    """Interface: ``detect(images) -> list (per image) of list[Face]``, largest face first."""

    name = ""

    def detect(self, images: list[Image.Image]) -> list[list[Face]]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# MTCNN
# ----------------------------------------------------------------------------------------------

class _PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class _RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()  # the weights were converted from a channels-last graph
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class _ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


def mtcnn_weights_dir() -> Path:
    """The folder of P/R/O-Net weights inside the installed facenet-pytorch wheel (not imported)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise RuntimeError("the default face detector needs the MTCNN weights shipped in facenet-pytorch: "
                           "pip install --no-deps facenet-pytorch==2.6.0")
    return Path(spec.origin).parent / "data"


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, method: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression (indices kept, by descending score)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel():
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx1, yy1 = torch.maximum(x1[i], x1[rest]), torch.maximum(y1[i], y1[rest])
        xx2, yy2 = torch.minimum(x2[i], x2[rest]), torch.minimum(y2[i], y2[rest])
        inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
        denom = torch.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return torch.stack(keep)


def _batched_nms(boxes, scores, groups, threshold, method="union"):
    keep = []
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        keep.append(idx[_nms(boxes[idx], scores[idx], threshold, method)])
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)


def _rerec(b):
    """Make boxes square around their centre."""
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = torch.maximum(w, h)
    b = b.clone()
    b[:, 0] = b[:, 0] + w * 0.5 - side * 0.5
    b[:, 1] = b[:, 1] + h * 0.5 - side * 0.5
    b[:, 2:4] = b[:, :2] + side[:, None]
    return b


def _bbreg(b, reg):
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b = b.clone()
    b[:, 0] += reg[:, 0] * w
    b[:, 1] += reg[:, 1] * h
    b[:, 2] += reg[:, 2] * w
    b[:, 3] += reg[:, 3] * h
    return b


def _crops(imgs: torch.Tensor, boxes: torch.Tensor, inds: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each (1-based, inclusive) box from its image, zero-padding outside, resized to ``size``."""
    h, w = imgs.shape[2:]
    out = []
    for b, i in zip(boxes.trunc().int().tolist(), inds.tolist()):
        x1, y1, x2, y2 = b[:4]
        x1c, y1c, x2c, y2c = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
        if x2c < x1c or y2c < y1c:
            out.append(torch.zeros(1, 3, size, size))
            continue
        crop = imgs[i: i + 1, :, y1c - 1: y2c, x1c - 1: x2c]
        out.append(F.interpolate(crop, size=(size, size), mode="area"))
    return torch.cat(out)


class MTCNNDetector(FaceDetector):
    """Three-stage cascaded CNN face detector with 5 landmarks (thresholds of the reference code)."""

    name = "mtcnn"

    def __init__(self, *, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 max_side: int | None = None, device: str = "cpu"):
        """``max_side``: detect on a copy downscaled to this longest side (boxes and landmarks are mapped
        back); the pyramid cost falls with the pixel count, at some landmark precision."""
        self.min_face_size, self.thresholds, self.factor, self.device = min_face_size, thresholds, factor, device
        self.max_side = max_side
        wdir = mtcnn_weights_dir()
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for net, file in ((self.pnet, "pnet.pt"), (self.rnet, "rnet.pt"), (self.onet, "onet.pt")):
            net.load_state_dict(torch.load(wdir / file, map_location="cpu", weights_only=True))
            net.eval().to(device)

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[list[Face]]:
        """Detect faces in same-size images as one batch (different sizes are run one by one)."""
        if len({im.size for im in images}) > 1:
            return [self.detect([im])[0] for im in images]
        w0, h0 = images[0].size
        if self.max_side and max(w0, h0) > self.max_side:
            k = self.max_side / max(w0, h0)
            small = [im.resize((round(w0 * k), round(h0 * k)), Image.BILINEAR) for im in images]
            max_side, self.max_side = self.max_side, None
            try:
                found = self.detect(small)
            finally:
                self.max_side = max_side
            return [[Face(f.box / k, f.score, f.landmarks / k) for f in faces] for faces in found]
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
        imgs = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device)
        n, _, h, w = imgs.shape
        scale = 12.0 / self.min_face_size
        min_len = min(h, w) * scale
        scales = []
        while min_len >= 12:
            scales.append(scale)
            scale *= self.factor
            min_len *= self.factor

        # Stage 1: P-Net over an image pyramid proposes candidate windows.
        all_boxes, all_inds = [], []
        for s in scales:
            data = F.interpolate(imgs, size=(int(h * s + 1), int(w * s + 1)), mode="area")
            reg, probs = self.pnet((data - 127.5) * 0.0078125)
            mask = probs[:, 1] >= self.thresholds[0]
            idx = mask.nonzero()
            if idx.numel() == 0:
                continue
            score = probs[:, 1][mask]
            r = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
            bb = idx[:, 1:].float().flip(1)  # (x, y) cell
            q1 = ((2 * bb + 1) / s).floor()
            q2 = ((2 * bb + 12) / s).floor()
            boxes = torch.cat([q1, q2, score[:, None], r], dim=1)
            keep = _batched_nms(boxes[:, :4], boxes[:, 4], idx[:, 0], 0.5)
            all_boxes.append(boxes[keep])
            all_inds.append(idx[keep, 0])
        results: list[list[Face]] = [[] for _ in range(n)]
        if not all_boxes:
            return results
        boxes, inds = torch.cat(all_boxes), torch.cat(all_inds)
        keep = _batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[keep], inds[keep]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                             boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]], dim=1)
        boxes = torch.cat([_rerec(boxes[:, :4]), boxes[:, 4:]], dim=1)

        # Stage 2: R-Net refines and rejects.
        reg, probs = self.rnet((_crops(imgs, boxes, inds, 24) - 127.5) * 0.0078125)
        ok = probs[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[ok, :4], probs[ok, 1:2]], dim=1)
        inds, reg = inds[ok], reg[ok]
        if boxes.numel() == 0:
            return results
        keep = _batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds, reg = boxes[keep], inds[keep], reg[keep]
        boxes = _bbreg(boxes, reg)
        boxes = torch.cat([_rerec(boxes[:, :4]), boxes[:, 4:]], dim=1)

        # Stage 3: O-Net gives the final boxes and the five landmarks.
        reg, points, probs = self.onet((_crops(imgs, boxes, inds, 48) - 127.5) * 0.0078125)
        ok = probs[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[ok, :4], probs[ok, 1:2]], dim=1)
        inds, reg, points = inds[ok], reg[ok], points[ok]
        if boxes.numel() == 0:
            return results
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * points[:, 5:10] + boxes[:, 1:2] - 1
        boxes = _bbreg(boxes, reg)
        keep = _batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7, "min")
        for k in keep.tolist():
            lm = torch.stack([px[k], py[k]], dim=1).cpu().numpy().astype(np.float64)
            results[int(inds[k])].append(Face(boxes[k, :4].cpu().numpy().astype(np.float64), float(boxes[k, 4]), lm))
        for faces in results:
            faces.sort(key=lambda f: f.area, reverse=True)
        return results


    @torch.no_grad()
    def refine(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[Face | None]:
        """Re-locate a known face cheaply: only O-Net, on a square around each previous box.

        Used by video tracking between full detections. Returns None where O-Net no longer sees a face
        (the caller then runs a full detection).
        """
        out: list[Face | None] = []
        for im, box in zip(images, boxes):
            b = torch.tensor([list(box) + [1.0]], dtype=torch.float32)
            w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            b[:, 0] -= 0.1 * w
            b[:, 1] -= 0.1 * h
            b[:, 2] += 0.1 * w
            b[:, 3] += 0.1 * h
            b = torch.cat([_rerec(b[:, :4]), b[:, 4:]], dim=1)
            # Crop with PIL first (zero fill outside the frame): only the face region becomes a tensor.
            x1, y1, x2, y2 = b[0, :4].trunc().int().tolist()
            crop = im.convert("RGB").crop((x1 - 1, y1 - 1, x2, y2)).resize((48, 48), Image.BOX)
            data = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)[None]
            reg, points, probs = self.onet((data - 127.5) * 0.0078125)
            if probs[0, 1] < self.thresholds[2]:
                out.append(None)
                continue
            bw, bh = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
            px = bw[:, None] * points[:, :5] + b[:, 0:1] - 1
            py = bh[:, None] * points[:, 5:10] + b[:, 1:2] - 1
            nb = _bbreg(torch.cat([b[:, :4], probs[:, 1:2]], dim=1), reg)
            lm = torch.stack([px[0], py[0]], dim=1).numpy().astype(np.float64)
            out.append(Face(nb[0, :4].numpy().astype(np.float64), float(probs[0, 1]), lm))
        return out


class YuNetDetector(FaceDetector):
    """OpenCV's YuNet (``cv2.FaceDetectorYN``); needs the ONNX model downloaded once by the user."""

    name = "yunet"

    def __init__(self, *, model_path: str | None = None, score_threshold: float = 0.7, **_: object):
        import cv2

        if not model_path or not Path(model_path).is_file():
            raise RuntimeError("the yunet detector needs model_path=face_detection_yunet_2023mar.onnx (download it "
                               "from the OpenCV model zoo); the default offline detector is 'mtcnn'")
        self.cv2, self.model_path, self.score_threshold = cv2, model_path, score_threshold

    def detect(self, images: list[Image.Image]) -> list[list[Face]]:
        out = []
        for im in images:
            bgr = np.asarray(im.convert("RGB"))[:, :, ::-1].copy()
            det = self.cv2.FaceDetectorYN.create(self.model_path, "", (bgr.shape[1], bgr.shape[0]),
                                                 self.score_threshold)
            _, faces = det.detect(bgr)
            found = []
            for f in faces if faces is not None else []:
                x, y, w, h = f[:4]
                # YuNet order: right eye, left eye (subject's), nose, right/left mouth corner -> image-left first
                lm = f[4:14].reshape(5, 2)[[1, 0, 2, 4, 3]] if f[4] > f[6] else f[4:14].reshape(5, 2)
                found.append(Face(np.array([x, y, x + w, y + h], dtype=np.float64), float(f[14]),
                                  lm.astype(np.float64)))
            out.append(sorted(found, key=lambda fc: fc.area, reverse=True))
        return out


DETECTORS: dict[str, type[FaceDetector]] = {c.name: c for c in (MTCNNDetector, YuNetDetector)}


def make_detector(name: str = "mtcnn", **options) -> FaceDetector:
    try:
        return DETECTORS[name](**options)
    except KeyError:
        raise KeyError(f"unknown face detector {name!r} (available: {sorted(DETECTORS)})") from None
