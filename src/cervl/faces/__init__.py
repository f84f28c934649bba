"""Faces: detection (``detect``: ``DETECTORS``, the MTCNN detection loop, YuNet; ``mtcnn_nets``: its three networks), 5-point alignment (``align``),
video decoding and tracking (``video``, ``track``), photo alignment with worker processes (``pipeline``),
and landmark geometry (``landmarks``: errors, flip-averaged landmarks).

Imports: ``cervl.core``."""

from cervl.faces.align import align_face, fit_similarity, template

__all__ = ["align_face", "fit_similarity", "template"]
