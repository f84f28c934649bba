"""MTCNN's three networks (P-Net, R-Net, O-Net), their weights and the box arithmetic between the stages.

The detection loop that drives them (image pyramid, cascade, largest-first search) is
:class:`cervl.faces.detect.MTCNNDetector`; the weights are the ones inside the ``facenet-pytorch`` wheel
(see :mod:`cervl.faces.detect`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cervl.core.errors import MissingResource


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
        raise MissingResource("the default face detector needs the MTCNN weights shipped in facenet-pytorch: "
                           "pip install --no-deps facenet-pytorch==2.6.0")
    return Path(spec.origin).parent / "data"


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression with MTCNN's inclusive-pixel areas; indices kept, best first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        inter = (np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1, 0, None)
                 * np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1, 0, None))
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float,
                 method: str = "union") -> np.ndarray:
    """NMS within each group (image): boxes of different groups are shifted apart so they never overlap."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    shift = (np.abs(boxes[:, :4]).max() + 1) * 4 * groups.astype(np.float64)
    shifted = boxes[:, :4] + shift[:, None]
    return _nms(shifted, scores, threshold, method)


def _rerec(b: np.ndarray) -> np.ndarray:
    """Make boxes (first 4 columns) square around their centre."""
    b = b.copy()
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2:4] = b[:, :2] + side[:, None]
    return b


def _bbreg(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply the networks' box regression (offsets relative to the box size)."""
    b = b.copy()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, 0:4] += reg[:, 0:4] * np.stack([w, h, w, h], axis=1)
    return b


def _halves(img: np.ndarray) -> list[np.ndarray]:
    """``img`` and its successive 2x box-filtered halves, for building the pyramid (:func:`_area_resize`)."""
    import cv2

    out = [img]
    while min(out[-1].shape[:2]) >= 48:
        a = out[-1]
        out.append(cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA))
    return out


def _area_resize(halves: list[np.ndarray], ws: int, hs: int) -> np.ndarray:
    """Area-averaging resize to ``(ws, hs)``, read from the smallest of an image's ``halves`` that is
    still at least four times the target size.

    ``cv2.resize(INTER_AREA)`` costs about the same (~1 ms at 640x480) whatever the output size, so
    resizing every pyramid level from the full image costs more than P-Net on the coarse levels.
    Averaging a 2x box average is the same average except at fractional cell borders; with the
    source at least 4x the target, the finest levels (small faces) still read the image itself and
    landmark error on SynthCE is unchanged (paired difference -0.0007 +- 0.0007 NME over 184 faces).
    """
    import cv2

    src = halves[0]
    for half in halves[1:]:
        if half.shape[1] >= 4 * ws and half.shape[0] >= 4 * hs:
            src = half
    return cv2.resize(src, (ws, hs), interpolation=cv2.INTER_AREA)


def _crops(imgs: list[np.ndarray], boxes: np.ndarray, inds: np.ndarray, size: int,
           halves: list[list[np.ndarray]] | None = None) -> torch.Tensor:
    """Cut each (1-based, inclusive) box out of its uint8 image, zero-padded where it leaves the image
    (as the reference MTCNN does), resized to ``size`` and normalised as the networks expect.

    With ``halves`` (per image, :func:`_halves`), a box at least 8x the output size is cut from a
    halved copy that is still 4x the output size, with its corners rounded to that copy's pixels:
    an area resize of a 400-px box costs as much as a whole R-Net batch, and the rounding moves a
    corner by at most 1/8 of a pixel of the output. Used for R-Net, whose boxes O-Net re-reads.
    """
    import cv2

    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for k, (b, i) in enumerate(zip(np.trunc(boxes[:, :4]).astype(np.int64), inds)):
        img = imgs[int(i)]
        x1, y1, x2, y2 = int(b[0]) - 1, int(b[1]) - 1, int(b[2]), int(b[3])  # 0-based, end exclusive
        if halves is not None:
            level, side = 0, max(x2 - x1, y2 - y1)
            while level + 1 < len(halves[int(i)]) and side >> (level + 1) >= 4 * size:
                level += 1
            if level:
                img, f = halves[int(i)][level], 1 << level
                x1, y1, x2, y2 = round(x1 / f), round(y1 / f), round(x2 / f), round(y2 / f)
        h, w = img.shape[:2]
        if x2 <= x1 or y2 <= y1:
            continue
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        if (cx1, cy1, cx2, cy2) == (x1, y1, x2, y2):
            patch = img[y1:y2, x1:x2]
        else:
            patch = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
            patch[cy1 - y1: cy2 - y1, cx1 - x1: cx2 - x1] = img[cy1:cy2, cx1:cx2]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return (torch.from_numpy(out).permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
