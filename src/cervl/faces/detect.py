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

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cervl.core.errors import InvalidInput, MissingResource
from cervl.core.registry import lookup
from cervl.faces.mtcnn_nets import _area_resize, _batched_nms, _bbreg, _crops, _halves, _nms, _ONet, _PNet, _rerec, _RNet, mtcnn_weights_dir

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

    def refine(self, images: list[Image.Image] | list[np.ndarray], boxes: list[np.ndarray]) -> list[Face | None]:
        """Re-locate known faces around their predicted boxes (cheaper than :meth:`detect`).

        None means "not confirmed": the video tracker then runs a full detection. Detectors without
        a cheap re-locator keep this default, so tracking with them detects whenever the flow stops.
        """
        return [None] * len(images)


# ----------------------------------------------------------------------------------------------
# MTCNN
# ----------------------------------------------------------------------------------------------

class MTCNNDetector(FaceDetector):
    """Three-stage cascaded CNN face detector with 5 landmarks (thresholds of the reference code).

    Networks run in PyTorch and batch over images (P-Net) and candidate windows (R-Net, O-Net);
    resizing, cropping and NMS run in OpenCV/numpy, which is several times faster than tensor ops for
    these small, ragged pieces of work.
    """

    name = "mtcnn"

    def __init__(self, *, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 max_side: int | None = 640, search: str = "all", device: str = "cpu"):
        """``min_face_size``: smallest face searched, in pixels of the image the pyramid runs on.

        ``max_side``: run the first two stages (the image pyramid, most of the cost) on a copy
        downscaled to this longest side; O-Net, which gives the landmarks, still reads the
        full-resolution image, so landmark precision is kept. With ``max_side=320`` on 640x480 input,
        faces from ``2 * min_face_size`` px up are found. The default, 640, leaves 640x480 frames
        and smaller at full size and keeps large photos (RAF-DB originals, HD frames) cheap.
        ``None`` always runs at full size.

        ``search``: ``all`` (default) runs the whole image pyramid and returns every face.
        ``largest`` searches from the largest face size down and stops, per image, once a face is
        confirmed and the remaining pyramid levels can only hold faces under half its size; the
        largest face is the same as with ``all`` (the finest levels, most of the cost, are skipped
        when faces are large, as in most expression photos) but smaller faces may be missing, so
        "how many faces" is only known within that size range.
        """
        if search not in ("all", "largest"):
            raise InvalidInput(f"search must be 'all' or 'largest', got {search!r}")
        self.min_face_size, self.thresholds, self.factor, self.device = min_face_size, thresholds, factor, device
        self.max_side, self.search = max_side, search
        wdir = mtcnn_weights_dir()
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for net, file in ((self.pnet, "pnet.pt"), (self.rnet, "rnet.pt"), (self.onet, "onet.pt")):
            net.load_state_dict(torch.load(wdir / file, map_location="cpu", weights_only=True))
            net.eval().to(device)

    @staticmethod
    def _arrays(images) -> list[np.ndarray]:
        return [im if isinstance(im, np.ndarray) else np.asarray(im.convert("RGB")) for im in images]

    @torch.no_grad()
    def detect(self, images: list[Image.Image] | list[np.ndarray]) -> list[list[Face]]:
        """Detect faces; same-size images run as one batch (different sizes one by one).

        Accepts PIL images or RGB uint8 arrays.
        """
        import cv2

        full = self._arrays(images)
        if len({a.shape for a in full}) > 1:
            return [self.detect([a])[0] for a in full]
        h0, w0 = full[0].shape[:2]
        k = 1.0
        small = full
        if self.max_side and max(w0, h0) > self.max_side:
            k = self.max_side / max(w0, h0)
            size = (round(w0 * k), round(h0 * k))
            small = [cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in full]
        halves = [_halves(a) for a in small]
        if self.search == "largest":
            results = self._largest_first(halves, full, k)
        else:
            results = self._cascade(halves, full, k, self._scales(*small[0].shape[:2]))
        for faces in results:
            faces.sort(key=lambda f: f.area, reverse=True)
        return results

    def _cascade(self, halves, full, k, scales) -> list[list[Face]]:
        """P-Net on the given pyramid levels, R-Net on the (possibly downscaled) search image
        ``halves[i][0]``, then O-Net on the full-resolution image ``full[i]``."""
        results: list[list[Face]] = [[] for _ in range(len(full))]
        boxes, inds = self._propose(halves, scales)
        if len(boxes):
            boxes, inds = self._refine_windows(halves, boxes, inds)
        if len(boxes) == 0:
            return results
        if k != 1.0:  # back to full-resolution coordinates (1-based pixel convention)
            boxes[:, :4] = (boxes[:, :4] - 0.5) / k + 0.5
        for face, i in zip(*self._output(full, boxes, inds, nms=True)):
            results[int(i)].append(face)
        return results

    def _largest_first(self, halves, full, k) -> list[list[Face]]:
        """The cascade over groups of pyramid levels, coarsest (largest faces) first.

        An image leaves the search once its largest confirmed face is at least twice the window of
        the next level: P-Net's window at scale ``s`` covers ``12 / s`` px and the regressions move a
        box by a fraction of its size, so no later level can return a larger face. Duplicates of one
        face from neighbouring levels are merged by the final stage's NMS, as in the full cascade.
        """
        h, w = halves[0][0].shape[:2]
        scales = self._scales(h, w)[::-1]
        # Levels go through the cascade in groups, to pay the per-call overhead of R-Net and O-Net
        # a few times rather than once per level: first all levels whose window is at least a
        # quarter of the short side (together cheaper than one fine level), then two at a time.
        n_coarse = sum(12.0 / s >= min(h, w) / 4 for s in scales)
        groups = [scales[:n_coarse]] + [scales[j:j + 2] for j in range(n_coarse, len(scales), 2)]
        found: list[list[Face]] = [[] for _ in range(len(full))]
        active = list(range(len(full)))
        done = 0
        for group in groups:
            if not group:
                continue
            level = self._cascade([halves[i] for i in active], [full[i] for i in active], k, group)
            for i, faces in zip(active, level):
                found[i] += faces
            done += len(group)
            next_window = 12.0 / scales[done] if done < len(scales) else 0.0
            active = [i for i in active
                      if not found[i] or max(f.box[2] - f.box[0] for f in found[i]) * k < 2 * next_window]
            if not active:
                break
        for i, faces in enumerate(found):
            if len(faces) > 1:
                b = np.array([list(f.box) + [f.score] for f in faces])
                found[i] = [faces[j] for j in _nms(b, b[:, 4], 0.7, "min")]
        return found

    def _scales(self, h: int, w: int) -> list[float]:
        """Pyramid scales, finest first: faces of ``min_face_size`` px up to the image's short side."""
        scale, min_len, out = 12.0 / self.min_face_size, min(h, w) * 12.0 / self.min_face_size, []
        while min_len >= 12:
            out.append(scale)
            scale *= self.factor
            min_len *= self.factor
        return out

    def _propose(self, halves: list[list[np.ndarray]], scales: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: P-Net over an image pyramid proposes square candidate windows.

        ``halves``: per image, the image and its successive halves (:func:`_halves`)."""
        h, w = halves[0][0].shape[:2]
        all_boxes, all_inds = [], []
        for scale in scales:
            hs, ws = int(h * scale + 1), int(w * scale + 1)
            level = np.stack([_area_resize(hv, ws, hs) for hv in halves])
            data = (torch.from_numpy(level).permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
            reg, probs = self.pnet(data.to(self.device))
            prob = probs[:, 1].cpu().numpy()
            img_i, ys, xs = np.nonzero(prob >= self.thresholds[0])
            if len(img_i):
                cell = np.stack([xs, ys], axis=1).astype(np.float64)
                q1 = np.floor((2 * cell + 1) / scale)
                q2 = np.floor((2 * cell + 12) / scale)
                r = reg.cpu().numpy()[img_i, :, ys, xs]
                boxes = np.concatenate([q1, q2, prob[img_i, ys, xs][:, None], r], axis=1)
                keep = _batched_nms(boxes, boxes[:, 4], img_i, 0.5)
                all_boxes.append(boxes[keep])
                all_inds.append(img_i[keep])
        if not all_boxes:
            return np.zeros((0, 9)), np.zeros(0, dtype=np.int64)
        boxes, inds = np.concatenate(all_boxes), np.concatenate(all_inds)
        keep = _batched_nms(boxes, boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[keep], inds[keep]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = np.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                          boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]], axis=1)
        return _rerec(boxes), inds

    def _refine_windows(self, halves, boxes, inds) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2: R-Net re-scores the candidates, rejects most, and regresses the rest."""
        crops = _crops([hv[0] for hv in halves], boxes, inds, 24, halves)
        reg, probs = (t.cpu().numpy() for t in self.rnet(crops.to(self.device)))
        ok = probs[:, 1] > self.thresholds[1]
        boxes = np.concatenate([boxes[ok, :4], probs[ok, 1:2]], axis=1)
        inds, reg = inds[ok], reg[ok]
        keep = _batched_nms(boxes, boxes[:, 4], inds, 0.7)
        return _rerec(_bbreg(boxes[keep], reg[keep])), inds[keep]

    def _output(self, imgs, boxes, inds, *, nms: bool) -> tuple[list[Face], np.ndarray]:
        """Stage 3: O-Net on full-resolution crops gives the final score, box and five landmarks."""
        reg, points, probs = (t.cpu().numpy() for t in self.onet(_crops(imgs, boxes, inds, 48).to(self.device)))
        ok = probs[:, 1] > self.thresholds[2]
        boxes = np.concatenate([boxes[ok, :4], probs[ok, 1:2]], axis=1)
        inds, reg, points = inds[ok], reg[ok], points[ok]
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * points[:, 5:10] + boxes[:, 1:2] - 1
        boxes = _bbreg(boxes, reg)
        keep = _batched_nms(boxes, boxes[:, 4], inds, 0.7, "min") if nms else np.arange(len(boxes))
        faces = [Face(boxes[j, :4].astype(np.float64), float(boxes[j, 4]),
                      np.stack([px[j], py[j]], axis=1).astype(np.float64)) for j in keep]
        return faces, inds[keep]

    @torch.no_grad()
    def refine(self, images: list[Image.Image] | list[np.ndarray], boxes: list[np.ndarray]) -> list[Face | None]:
        """Re-locate known faces cheaply: O-Net alone, on the square around each predicted box, all
        images in one batch. Used by video tracking between full detections. Returns None where O-Net
        no longer sees a face (the caller then runs a full detection).

        The crop is not enlarged: O-Net was trained on tight face boxes, and on a moving-face clip
        growing the box by 10% per side doubled the landmark error (NME 0.018 -> 0.037).
        """
        if not images:
            return []
        b = np.asarray([list(box[:4]) + [1.0] for box in boxes], dtype=np.float64)
        faces, inds = self._output(self._arrays(images), _rerec(b), np.arange(len(images)), nms=False)
        out: list[Face | None] = [None] * len(images)
        for face, i in zip(faces, inds):
            out[int(i)] = face
        return out


class YuNetDetector(FaceDetector):
    """OpenCV's YuNet (``cv2.FaceDetectorYN``); needs the ONNX model downloaded once by the user."""

    name = "yunet"

    def __init__(self, *, model_path: str | None = None, score_threshold: float = 0.7, **_: object):
        import cv2

        if not model_path or not Path(model_path).is_file():
            raise MissingResource("the yunet detector needs model_path=face_detection_yunet_2023mar.onnx (download it "
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


# ----------------------------------------------------------------------------------------------
# Flip-averaged landmarks (cervl.faces.landmarks measures what they gain)
# ----------------------------------------------------------------------------------------------
MIRROR = [1, 0, 2, 4, 3]  # left eye <-> right eye, nose, left mouth corner <-> right


class FlipAveraged(FaceDetector):
    """``detector`` on the image and on its mirror; each face's landmarks averaged with its mirrored match."""

    def __init__(self, detector: FaceDetector):
        self.detector, self.name = detector, f"{detector.name}+flip"

    def detect(self, images) -> list[list[Face]]:
        from PIL import ImageOps

        images = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
        plain = self.detector.detect(images)
        mirrored = self.detector.detect([ImageOps.mirror(im.convert("RGB")) for im in images])
        return [[self._average(f, flipped, im.size[0]) for f in faces]
                for faces, flipped, im in zip(plain, mirrored, images)]

    @staticmethod
    def _average(face: Face, flipped: list[Face], width: int) -> Face:
        best, best_iou = None, 0.5  # a twin must overlap the face well, or the face keeps its own landmarks
        for g in flipped:
            box = np.array([width - 1 - g.box[2], g.box[1], width - 1 - g.box[0], g.box[3]])
            iou = _iou(face.box, box)
            if iou > best_iou:
                best, best_iou = g, iou
        if best is None:
            return face
        back = best.landmarks[MIRROR].copy()
        back[:, 0] = width - 1 - back[:, 0]
        return Face(face.box, face.score, (face.landmarks + back) / 2)

    def refine(self, images, boxes):
        return self.detector.refine(images, boxes)  # video tracking: O-Net re-location as before


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


DETECTORS: dict[str, type[FaceDetector]] = {c.name: c for c in (MTCNNDetector, YuNetDetector)}


def make_detector(name: str = "mtcnn", *, landmarks: str = "single", **options) -> FaceDetector:
    """Build the detector registered as ``name``; errors inside its constructor surface as themselves.

    ``landmarks="flip"``: also detect on the mirrored image and average each face's landmarks with its
    mirrored twin's (:class:`cervl.faces.landmarks.FlipAveraged`; about twice the detection time).
    """
    if landmarks not in ("single", "flip"):
        raise InvalidInput(f"landmarks must be 'single' or 'flip', got {landmarks!r}")
    detector = lookup(DETECTORS, name, "face detector")(**options)
    if landmarks == "flip":
        detector = FlipAveraged(detector)
    return detector
