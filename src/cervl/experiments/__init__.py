"""Experiments over recipes: ablation grids (``ablate``).

Imports: ``train`` and everything below it.
"""
