"""How well a score picks out flagged samples (mislabeled, corrupted, rare): ranking metrics and their tables."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from sui_core.io import atomic_path


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


def rare_subgroup_report(score: np.ndarray, label: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """Per group (e.g. the original class of a merged class, data.subclass) the mean score, and for
    each class made of several groups the AUROC of the score for picking out its smallest group among
    that class's samples (the under-sampled subclass, paper A.6). Samples without a group are ignored."""
    group = np.asarray(group, dtype=object)
    has = np.array([g is not None for g in group])
    out: dict[str, float] = {}
    for name in sorted({str(g) for g in group[has]}):
        out[f"mean_group_{name}"] = float(score[has & (group == name)].mean())
    for c in np.unique(label[has]):
        members = has & (label == c)
        names, counts = np.unique(group[members].astype(str), return_counts=True)
        if len(names) > 1:
            rare = names[np.argmin(counts)]
            found = detection_metrics(score[members], group[members].astype(str) == rare, [])
            out[f"rare_group_{rare}_auroc"] = found["auroc"]
    return out


def write_table(rows: dict[str, dict[str, float]], columns: list[str], csv_path, md_path) -> None:
    """One row per method: a CSV and a markdown table (4 decimals) of the same numbers."""
    with atomic_path(csv_path) as tmp:
        lines = [",".join(["method", *columns])]
        lines += [",".join([name, *(repr(float(row.get(c, np.nan))) for c in columns)]) for name, row in rows.items()]
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(md_path) as tmp:
        lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [
            f"| {name} | " + " | ".join(f"{row.get(c, np.nan):.4f}" for c in columns) + " |"
            for name, row in rows.items()
        ]
        tmp.write_text("\n".join(lines) + "\n")
