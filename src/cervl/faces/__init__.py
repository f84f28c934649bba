"""Face detection and 5-point alignment."""

from cervl.faces.align import align_face, fit_similarity, template

__all__ = ["align_face", "fit_similarity", "template"]
