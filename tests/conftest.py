"""Shared fixtures: small files in real dataset layouts, built per test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(os.environ.get("CERVL_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def write_jpg(path: Path, seed: int = 0, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def jpg():
    return write_jpg


@pytest.fixture
def shared_dir() -> Path:
    """../shared (or $CERVL_SHARED); tests that need it skip cleanly without it."""
    if not (SHARED / "qwen2-vl-tokenizer" / "tokenizer.json").is_file():
        pytest.skip(f"shared reference files not found at {SHARED} (set CERVL_SHARED)")
    return SHARED
