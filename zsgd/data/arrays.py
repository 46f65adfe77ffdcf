"""The one in-memory shape every data set takes, shared by every loader.

Kept apart from the loaders (``datasets``, ``embedded``, ``imagefolder``) so
that each of them can build a ``Dataset`` without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

@dataclass
class Dataset:
    """A labelled image data set in memory, already split into train and test."""

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    # Files that could not be decoded (image folders only); reported, not fatal.
    skipped: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image: what a model's first layer must accept."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def n_classes(self) -> int:
        """Number of classes, the width of a classifier's output layer."""
        return len(self.classes)

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Samples per class in ``"train"`` or ``"test"``, for summaries and checks."""
        labels = self.y_train if split == "train" else self.y_test
        return np.bincount(labels, minlength=self.n_classes)


def to_float(x_uint8: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1] (255 maps to exactly 1.0).

    Called per batch, not per data set, so the resident copy stays uint8.
    """
    if x_uint8.dtype != np.uint8:
        raise TypeError(f"to_float expects uint8 pixels, got {x_uint8.dtype}")
    out = x_uint8.astype(np.float32)
    out /= np.float32(255.0)
    return out
