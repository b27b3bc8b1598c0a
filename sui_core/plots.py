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


def histogram(
    values: np.ndarray, path: str | Path, xlabel: str, groups: dict[str, np.ndarray] | None = None, title: str = ""
) -> None:
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


def gallery(
    images: np.ndarray, scores: np.ndarray, labels: np.ndarray, path: str | Path, size: int, score_name: str = "F-SI"
) -> None:
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
        axes[r, 0].text(
            -0.1, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center", fontsize=8
        )
    fig.suptitle(f"{score_name}: least (top row) and most (bottom row) informative", fontsize=9)
    _save(fig, path)


def suspects_gallery(
    images: np.ndarray,
    order: np.ndarray,
    given: np.ndarray,
    predicted: np.ndarray,
    flagged: np.ndarray,
    path: str | Path,
    size: int,
) -> None:
    """The `size` first samples of `order` (most suspect first), each titled with its rank, its given
    label and the label its leave-one-out prediction gives; flagged ones in red."""
    idx = order[:size]
    cols = min(10, max(len(idx), 1))
    rows = max(1, -(-len(idx) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.75 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for rank, (ax, i) in enumerate(zip(axes.flat, idx), start=1):
        ax.imshow(_as_image(images[i]), cmap="gray")
        color = "tab:red" if flagged[i] else "black"
        ax.set_title(f"#{rank}\ngiven {given[i]}\npredicted {predicted[i]}", fontsize=7, color=color)
    fig.suptitle("Most suspect labels: given label vs the leave-one-out prediction (red: flagged)", fontsize=9)
    _save(fig, path)


def attribution_gallery(
    target_images: np.ndarray,
    target_titles: list[str],
    train_images: np.ndarray,
    proponents: np.ndarray,
    opponents: np.ndarray,
    proponent_titles: list[list[str]],
    opponent_titles: list[list[str]],
    path: str | Path,
    per_side: int = 4,
) -> None:
    """One row per target: the target image, its `per_side` top proponents (training rows, green
    titles) and its top opponents (red titles)."""
    rows = max(1, len(target_images))
    cols = 1 + 2 * per_side
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.6 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r in range(len(target_images)):
        axes[r, 0].imshow(_as_image(target_images[r]), cmap="gray")
        axes[r, 0].set_title(target_titles[r], fontsize=7, fontweight="bold")
        for side, (rows_of, titles, color) in enumerate(
            ((proponents, proponent_titles, "tab:green"), (opponents, opponent_titles, "tab:red"))
        ):
            for j, i in enumerate(rows_of[r][:per_side]):
                ax = axes[r, 1 + side * per_side + j]
                ax.imshow(_as_image(train_images[i]), cmap="gray")
                ax.set_title(titles[r][j], fontsize=6, color=color)
    fig.suptitle(
        "Each validation target, its top proponents (green: without them the prediction loses most) and "
        "opponents (red)",
        fontsize=9,
    )
    _save(fig, path)


def is_image(input_shape: list[int]) -> bool:
    return len(input_shape) == 3 and input_shape[0] in (1, 3) and min(input_shape[1:]) >= 4


def _as_image(x: np.ndarray) -> np.ndarray:
    """(C, H, W) → (H, W) or (H, W, 3) scaled to [0, 1] for imshow."""
    img = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def bars(
    values: dict[str, dict[str, float]], path: str | Path, ylabel: str, title: str = "", log: bool = False
) -> None:
    """Grouped bars: one group per key of `values`, one bar per inner key (e.g. per method: AUROC, AP)."""
    names = list(values)
    series = list(dict.fromkeys(key for row in values.values() for key in row))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) * max(len(series), 1)), 3.8))
    for j, key in enumerate(series):
        heights = [values[name].get(key, np.nan) for name in names]
        ax.bar(np.arange(len(names)) + (j - (len(series) - 1) / 2) * width, heights, width, label=key)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def curves_with_bands(
    x: np.ndarray,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> None:
    """One line per curve (mean) with a ± std band, e.g. test accuracy vs fraction removed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (mean, std) in curves.items():
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=name)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def matrix(values: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> None:
    """A small annotated square matrix (e.g. rank correlations between score variants)."""
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.2))
    image = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def scatter_grid(
    truth: dict[str, np.ndarray], estimates: dict[str, dict[str, np.ndarray]], path: str | Path, title: str = ""
) -> None:
    """Estimate against truth on log-log axes: one row per quantity (keys of `truth`), one column per
    method (keys of `estimates`, each {quantity: values}), Pearson in each panel's title."""
    rows, cols = list(truth), list(estimates)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols), 3.0 * len(rows)), squeeze=False)
    for i, quantity in enumerate(rows):
        for j, method in enumerate(cols):
            ax, real, est = axes[i][j], truth[quantity], estimates[method][quantity]
            ax.scatter(real, np.abs(est), s=10)
            if (real > 0).all() and (np.abs(est) > 0).all():
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_title(f"{method}: r = {np.corrcoef(real, est)[0, 1]:.3f}", fontsize=9)
            ax.set_xlabel(f"real {quantity}", fontsize=8)
            ax.set_ylabel("estimate", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def paired(a: np.ndarray, b: np.ndarray, path: str | Path, xlabel: str, ylabel: str, title: str = "") -> None:
    """One point per item with its two values (e.g. a score under two methods) and the diagonal: points
    above it are where the second method is higher."""
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(a, b, s=8, alpha=0.6)
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, path)
