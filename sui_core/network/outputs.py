"""How labels become the network's outputs: how many outputs (k) and the regression targets (n, k).

Kept apart from `sui_core.network.models` so that the stages that need only targets (ntk, loo, suspects)
do not import torch (seconds of fixed cost per stage).
"""

from __future__ import annotations

import numpy as np

from sui_core.errors import DataError


def num_outputs(num_classes: int) -> int:
    """Two classes need one output (the label in {0, 1}); more need one output per class."""
    if num_classes < 2:
        raise DataError(f"need at least 2 classes, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Regression targets (n, k) float64: the label itself for k = 1, one-hot otherwise."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    if num_outputs(num_classes) == 1:
        return labels[:, None].astype(np.float64)
    return np.eye(num_classes, dtype=np.float64)[labels]
