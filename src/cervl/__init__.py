"""cervl: Compound Expression Recognition with large Vision-Language models."""

__version__ = "0.1.0"
