"""Following one face through a video: which face to keep, and how to move its landmarks cheaply.

* :class:`FaceTracker` picks the face to follow among a frame's detections (the largest at first,
  then the one overlapping the last box most).
* :class:`LandmarkFlow` moves the five landmarks from one frame to the next with pyramidal
  Lucas-Kanade optical flow, restricted to a window around the face, and rejects points whose
  forward-backward error is large. It costs a fraction of a millisecond per frame, against ~1.6 ms
  for MTCNN's O-Net and tens of milliseconds for a full detection, so a video pipeline can run
  O-Net only every few frames (to stop drift and confirm the face) and a full detection rarely.
"""

from __future__ import annotations

import numpy as np

from cervl.faces.align import apply_affine, fit_similarity
from cervl.faces.detect import Face


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``x1, y1, x2, y2`` boxes."""
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceTracker:
    """Follow one person: start with the largest face, then keep the face overlapping the last box most."""

    def __init__(self, min_iou: float = 0.2):
        self.min_iou = min_iou
        self.last: np.ndarray | None = None

    def choose(self, faces: list[Face]) -> tuple[Face | None, str]:
        """Pick the face to follow; status ``tracked``, ``switched`` (no overlap: nearest centre) or ``lost``."""
        if not faces:
            return None, "lost"
        if self.last is None:
            chosen, status = faces[0], "tracked"
        else:
            scores = [iou(self.last, f.box) for f in faces]
            best = int(np.argmax(scores))
            if scores[best] >= self.min_iou:
                chosen, status = faces[best], "tracked"
            else:  # the person left or was missed: fall back to the nearest face centre
                centre = (self.last[:2] + self.last[2:]) / 2
                dist = [np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre) for f in faces]
                chosen, status = faces[int(np.argmin(dist))], "switched"
        self.last = chosen.box
        return chosen, status


def moved_box(box: np.ndarray, old_landmarks: np.ndarray, new_landmarks: np.ndarray) -> np.ndarray:
    """Carry a box along with its landmarks: the similarity that maps old to new landmarks, applied to
    the box corners, then the axis-aligned bounds."""
    m = fit_similarity(old_landmarks, new_landmarks)
    x1, y1, x2, y2 = box[:4]
    corners = apply_affine(m, np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]]))
    return np.concatenate([corners.min(0), corners.max(0)])


class LandmarkFlow:
    """Pyramidal Lucas-Kanade flow of the five landmarks between two grey frames.

    The flow runs on a window around the face (the box grown by ``margin`` on each side), so its cost
    does not depend on the frame size. The patch size follows the face: half the distance between
    the eyes, within [15, 41] px (smaller patches lost the low-texture nose tip). A point fails
    when flow does not converge or when tracking it back lands more than ``max_fb_error``
    inter-ocular distances from where it started; any failure returns None, and the caller
    re-locates the face with a detector.
    """

    def __init__(self, margin: float = 0.3, max_fb_error: float = 0.04, levels: int = 2):
        self.margin, self.max_fb_error, self.levels = margin, max_fb_error, levels

    def track(self, prev_gray: np.ndarray, gray: np.ndarray, landmarks: np.ndarray,
              box: np.ndarray) -> np.ndarray | None:
        """New (5, 2) landmarks in ``gray``, or None when the flow is not trustworthy."""
        import cv2

        h, w = gray.shape[:2]
        bw, bh = box[2] - box[0], box[3] - box[1]
        x1, y1 = int(max(0, box[0] - self.margin * bw)), int(max(0, box[1] - self.margin * bh))
        x2, y2 = int(min(w, box[2] + self.margin * bw)), int(min(h, box[3] + self.margin * bh))
        if x2 - x1 < 16 or y2 - y1 < 16:
            return None
        offset = np.array([x1, y1], dtype=np.float32)
        iod = float(np.linalg.norm(landmarks[1] - landmarks[0]))
        side = int(np.clip(iod / 2, 15, 41)) | 1
        params = dict(winSize=(side, side), maxLevel=self.levels,
                      criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
        a, b = prev_gray[y1:y2, x1:x2], gray[y1:y2, x1:x2]
        pts = (landmarks.astype(np.float32) - offset).reshape(-1, 1, 2)
        fwd, ok1, _ = cv2.calcOpticalFlowPyrLK(a, b, pts, None, **params)
        if fwd is None or not ok1.all():
            return None
        back, ok2, _ = cv2.calcOpticalFlowPyrLK(b, a, fwd, None, **params)
        if back is None or not ok2.all():
            return None
        fb = np.linalg.norm((back - pts).reshape(-1, 2), axis=1)
        if fb.max() > self.max_fb_error * max(iod, 1.0):
            return None
        return fwd.reshape(-1, 2).astype(np.float64) + offset
