"""Bundled demo model: a small Keras classifier for scikit-learn's 8x8 digits (see README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL_PATH: Path = Path(__file__).resolve().parent / "digits.keras"
SAMPLES_PATH: Path = Path(__file__).resolve().parent / "samples.npz"


def load_samples() -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y): a few test images as float32 [n, 64] and their int64 labels."""
    with np.load(SAMPLES_PATH) as data:
        return data["x"], data["y"]
