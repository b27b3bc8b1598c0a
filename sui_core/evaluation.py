"""How well a score picks out flagged samples (mislabeled, corrupted, rare): ranking metrics."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def detection_metrics(score: np.ndarray, flagged: np.ndarray, top_fractions: list[float]) -> dict[str, float]:
    """AUROC, average precision, and for each fraction f the share of flagged samples found among
    the top f of samples ranked by score (recall at f). Needs flagged and unflagged samples both."""
    flagged = np.asarray(flagged, dtype=bool)
    if flagged.all() or not flagged.any():
        return {}
    out = {"auroc": float(roc_auc_score(flagged, score)), "ap": float(average_precision_score(flagged, score))}
    order = np.argsort(-score, kind="stable")
    for f in top_fractions:
        top = order[: int(round(f * len(score)))]
        out[f"found_at_{round(f * 100)}pct"] = float(flagged[top].sum() / flagged.sum())
    return out
