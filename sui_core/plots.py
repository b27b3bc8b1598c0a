"""Figures people would rather look at than read: score histograms and image galleries (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sui_core.io import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def histogram(values: np.ndarray, path: str | Path, xlabel: str, groups: dict[str, np.ndarray] | None = None,
              title: str = "") -> None:
    """Histogram of a score on a log axis (scores span orders of magnitude), optionally split by group."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    positive = values[values > 0]
    lo, hi = (positive.min(), positive.max()) if len(positive) else (1e-12, 1.0)
    bins = np.geomspace(lo, hi * 1.0001, 40) if hi > lo else 40
    for name, mask in (groups or {"all samples": np.ones(len(values), bool)}).items():
        ax.hist(np.clip(values[mask], lo, None), bins=bins, alpha=0.6, label=f"{name} ({mask.sum()})")
    if hi > lo:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def gallery(images: np.ndarray, scores: np.ndarray, labels: np.ndarray, path: str | Path, size: int,
            score_name: str = "F-SI") -> None:
    """The `size` least and most informative images (paper Fig. 1/4), with label and score."""
    order = np.argsort(scores, kind="stable")
    rows = {"least informative": order[:size], "most informative": order[::-1][:size]}
    fig, axes = plt.subplots(2, size, figsize=(1.3 * size, 3.4), squeeze=False)
    for r, (name, idx) in enumerate(rows.items()):
        for c in range(size):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(idx):
                i = idx[c]
                ax.imshow(_as_image(images[i]), cmap="gray")
                ax.set_title(f"y={labels[i]}\n{scores[i]:.2e}", fontsize=7)
        axes[r, 0].text(-0.1, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, ha="right",
                        va="center", fontsize=8)
    fig.suptitle(f"{score_name}: least (top row) and most (bottom row) informative", fontsize=9)
    _save(fig, path)


def is_image(input_shape: list[int]) -> bool:
    return len(input_shape) == 3 and input_shape[0] in (1, 3) and min(input_shape[1:]) >= 4


def _as_image(x: np.ndarray) -> np.ndarray:
    """(C, H, W) → (H, W) or (H, W, 3) scaled to [0, 1] for imshow."""
    img = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
