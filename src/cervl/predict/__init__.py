"""Prediction: exact constrained scoring, generation, the Predictor facade, and video.

* :mod:`cervl.predict.scoring`: :class:`LabelScorer` (exact, shared-prefix) and the brute-force reference;
* :mod:`cervl.predict.generate`: greedy generation and :func:`parse_answer`;
* :mod:`cervl.predict.predictor`: :class:`Predictor`, :class:`Item` and the input helpers;
* :mod:`cervl.predict.video`: per-frame prediction, temporal smoothing and plots.

Imports: ``core``, ``faces``, ``data``, ``models``, ``run``."""

from cervl.core.images import load_rgb
from cervl.predict.generate import generate_answers, parse_answer
from cervl.predict.predictor import Item, Predictor, write_predictions
from cervl.predict.scoring import LabelScorer, score_labels, score_labels_bruteforce
from cervl.predict.video import plot_video_probs, predict_video, predict_videos, smooth

__all__ = ["Item", "LabelScorer", "Predictor", "generate_answers", "load_rgb", "parse_answer", "plot_video_probs",
           "predict_video", "predict_videos", "score_labels", "score_labels_bruteforce", "smooth",
           "write_predictions"]
