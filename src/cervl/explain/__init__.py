"""Seeing why: saliency maps (occlusion, gradient), their figures, and SynthCE's action-unit regions.

* :mod:`cervl.explain.maps`: :class:`Explainer` over an :class:`ImageScorer` (:class:`VLMScorer` for a
  :class:`~cervl.predict.Predictor`);
* :mod:`cervl.explain.regions`: the pixels each AU moves on a SynthCE face, pointing game, energy ratio;
* :mod:`cervl.explain.figures`: overlays and map grids;
* :mod:`cervl.explain.analysis`: ``cervl explain`` (per image, per class, confused pairs, report section).

Imports: ``core`` .. ``evaluate`` (never ``train`` or above)."""

from cervl.explain.maps import Explainer, Explanation, ImageScorer, VLMScorer

__all__ = ["Explainer", "Explanation", "ImageScorer", "VLMScorer"]
