"""Label errors in the user's own data, with no known flips: which samples to look at, and how many of
the flagged ones are likely wrong.

**Scores.** The candidate detectors of `sui_core.studies.detection` that need nothing but the
linearized model's exact leave-one-out solution (the leave-one-out and training losses, F-SI per unit of
leverage and its products with the losses), computed by one solve
(`sui_core.linearized.scores.loo_quadratic_forms`) for the labels as given. Plain F-SI is not one: its
high scores hold atypical right labels (the detection module doc), and the copies do not see that —
measured on MNIST 4 vs 9 over 7 splits (docs/results.md), the copies chose it twice and it was then
0.08–0.14 AP below the best candidate; without it the choice was on average 0.015 below the best.

The predicted label of a sample is that of its leave-one-out prediction f₋ᵢ(x_i) = y_i − (y_i − f₋ᵢ(x_i)):
what the model says when it has not seen the sample, the class whose output is largest (k > 1), or
output > ½ (one output).

**Choosing a detector without known flips.** Copies of the user's data get seeded synthetic flips: a
seeded `flip_fraction` of the samples, the set S, each moved to another class — `uniform` (a uniformly
drawn other class) and, with more than two classes, `confusion` (the class its leave-one-out prediction
ranks highest among the others: the errors a labeller makes most). For the linearized model a copy
changes only the targets, so it reuses the Jacobians and the eigenbasis: each copy costs one more
leave-one-out solve (seconds), never a Jacobian or a retraining. The user's own wrong labels are in
every copy too, unknown, so "injected vs the rest" would punish a detector for finding them. Instead
each candidate is judged on S alone: the average precision of telling the scores of S after the flips
(mostly wrong labels) from the same samples' scores before (mostly right ones), the latter weighted
(1 − f)/f so that wrong labels make up the copies' share f = `flip_fraction`, as at the top of a real
ranking (AP, not AUROC: measured, AUROC tied the leave-one-out and the training loss on Fashion-MNIST
T-shirt vs Shirt while their AP for real flips differs by 0.05). A share π of wrong labels in S turns
about π of the pairs around, the same for every candidate, which keeps their order. The best mean over
the copies is chosen; `stability` is the share of copies whose own best is the chosen one. The real
data's scores never saw a flip they were tuned on.

**Threshold for a stated precision.** For the chosen score let T(τ) be the share of wrong labels
scoring ≥ τ and F(τ) that of right ones. On the data as given the share scoring ≥ τ is
q(τ) = π T + (1 − π) F. On S after a uniform flip a wrong label moves to its right class with
probability c (1 for two classes, 1/(C − 1) for C), so S holds wrong labels in share e = (1 − π) +
π(1 − c) and a(τ) = e T + (1 − e) F (averaged over the uniform copies). At the top of the score, where
no right label reaches (F ≈ 0), q/a = π/e gives π = r/(1 + r·c), r = q/a. F > 0 only raises that
value (q ≥ π T everywhere: the bound of mixture-proportion estimation), so π̂ is its least value over
the thresholds that 10–60 % of the flipped samples reach (`BAND`: above it a handful of samples make it
noise). Measured in docs/results.md "Label errors in your own data": within 0.01 of the truth on MNIST
4 vs 9, 0.03–0.04 high where right labels look wrong (digits 3 vs 8 at n = 284, Fashion-MNIST T-shirt
vs Shirt). With π̂, the two
equations give T and F at every τ, the flagged set's precision π̂T/q and recall T. The flagged set
is every sample scoring ≥ τ* for the lowest τ* whose estimated precision reaches `precision` (none
if no τ does).

**Baselines beside it** (`suspects.baselines`: the real network's loss, EL2N, cleanlab): scored on the
same samples and written beside the suspicion, but never candidates of the choice: judging them on a
flipped copy takes a real training per copy (cleanlab one per fold), 8–16× the detection's cost where
the target is ≤ 3× (the linearized candidates reuse the basis). Their flagged sets (`baseline_flags`):
cleanlab's own `find_label_issues` set; the loss and EL2N, which have no threshold of their own, their
top samples, as many as sui flagged, so both are compared at the same budget. Against known wrong
labels (injected, or the user's own flags) every flagged set gets its measured precision and recall
(`against_known`), reported only.

What the estimate assumes (docs/decisions.md): the user's wrong labels score like injected uniform
flips; a copy's flips change the other samples' scores little (hence a small `flip_fraction`); the
top scores hold almost no right labels; π < ½.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score

from sui_core.config import FLIP_KINDS
from sui_core.linearized.ntk import Basis
from sui_core.linearized.scores import loo_quadratic_forms
from sui_core.linearized.solver import Recipe
from sui_core.network.outputs import num_outputs, targets
from sui_core.studies import detection
from sui_core.studies.evaluation import detection_metrics

# the detectors of sui_core.studies.detection that need only the leave-one-out solution at the recipe's t
CANDIDATES = (
    "loo_loss",
    "train_loss",
    "fsi_over_leverage",
    "fsi_over_leverage_x_loo_loss",
    "fsi_over_leverage_x_train_loss",
)

# π̂ is the least of its estimates at the thresholds that this share of the flipped samples reaches
BAND = (0.1, 0.6)


@dataclass
class Detectors:
    """Every candidate's score (higher = more suspect) and each sample's leave-one-out prediction."""

    scores: dict[str, np.ndarray]  # CANDIDATES, each (n,)
    loo_prediction: np.ndarray  # (n, k) f₋ᵢ(x_i)


def detectors(
    basis: Basis,
    f0: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe: Recipe,
    tol: float,
    labelled: str = "labels as given",
) -> Detectors:
    """The candidates for `labels` (n,), from one leave-one-out solve in `basis` (f0: outputs at w0), its
    progress bar described as `labelled` (which labels these are)."""
    y = targets(labels, num_classes)
    progress = f"suspects, {labelled}"
    result = loo_quadratic_forms(basis, y - f0, recipe, None, tol, progress=progress, wanted=("fsi_sum",))
    fsi = result.forms["fsi_sum"]
    found = detection.sui_detectors(fsi, result.fit)
    scores = {name: found[name] if name in found else result.fit[name] for name in CANDIDATES}
    return Detectors(scores, y - result.loo_error)


def predicted_labels(outputs: np.ndarray) -> np.ndarray:
    """The class of each row of outputs (n, k): argmax for k > 1, output > ½ for one output."""
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0.5).astype(np.int64)
    return np.argmax(outputs, axis=1).astype(np.int64)


def flip(
    labels: np.ndarray, num_classes: int, fraction: float, kind: str, seed: int, loo_prediction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `labels` with round(fraction·n) seeded samples moved to another class (see the module
    doc for `kind`); returns the copy and the mask of moved samples."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    moved = np.zeros(n, dtype=bool)
    moved[rng.choice(n, size=max(1, round(fraction * n)), replace=False)] = True
    out = labels.copy()
    idx = np.flatnonzero(moved)
    if kind == "uniform" or num_classes == 2:
        shift = rng.integers(1, num_classes, size=len(idx))
        out[idx] = (labels[idx] + shift) % num_classes
    elif kind == "confusion":
        ranked = loo_prediction[idx].copy()
        ranked[np.arange(len(idx)), labels[idx]] = -np.inf
        out[idx] = np.argmax(ranked, axis=1)
    else:
        raise ValueError(f"unknown flip kind {kind!r} (known: {', '.join(FLIP_KINDS)})")
    return out, moved


@dataclass
class Calibration:
    """How the detector and its threshold were chosen on flipped copies of the user's data."""

    copies: list[dict]  # per copy: kind, seed, flips, and per candidate the AP of S after vs before
    chosen: str  # the candidate with the best mean AP over the copies
    stability: float  # share of copies whose own best candidate is `chosen`
    threshold: float  # flag scores ≥ threshold (inf: nothing reaches the precision)
    target_precision: float
    estimated_error_rate: float  # π̂
    estimated_precision: float  # of the flagged set (nan when none is flagged)
    estimated_recall: float  # estimated share of the wrong labels in the flagged set
    flagged: int

    def mean_ap(self) -> dict[str, float]:
        return {name: float(np.mean([c["ap"][name] for c in self.copies])) for name in CANDIDATES}

    def record(self) -> dict:
        return {
            "chosen": self.chosen,
            "stability": self.stability,
            "threshold": self.threshold if np.isfinite(self.threshold) else None,
            "target_precision": self.target_precision,
            "estimated_error_rate": self.estimated_error_rate,
            "estimated_precision": None if np.isnan(self.estimated_precision) else self.estimated_precision,
            "estimated_recall": self.estimated_recall,
            "flagged": self.flagged,
            "mean_ap": self.mean_ap(),
            "copies": self.copies,
        }


def share_at_least(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The share of `scores` ≥ each threshold."""
    return 1 - np.searchsorted(np.sort(scores), thresholds, side="left") / len(scores)


def error_rates(q: np.ndarray, a: np.ndarray, right_class: float):
    """π̂ and T, F at every threshold (descending) from q (the data as given) and a (the flipped sets),
    the module doc's equations; π̂ is the least of q/a's estimates over the thresholds in `BAND`."""
    band = (a >= BAND[0]) & (a <= BAND[1]) & (q > 0)
    pi = 0.0
    if band.any():
        r = q[band] / a[band]
        pi = float(np.clip(np.min(r / (1 + r * right_class)), 0.0, 0.499))
    e = (1 - pi) + pi * (1 - right_class)
    # q = π T + (1 − π) F, a = e T + (1 − e) F
    det = pi * (1 - e) - (1 - pi) * e
    t = np.clip(((1 - e) * q - (1 - pi) * a) / det, 0.0, 1.0)
    f = np.clip((pi * a - e * q) / det, 0.0, 1.0)
    return pi, t, f


def calibrate(
    basis: Basis,
    f0: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe: Recipe,
    given: Detectors,
    kinds: list[str],
    seeds: list[int],
    fraction: float,
    precision: float,
    tol: float = 1e-14,
) -> Calibration:
    """Choose the detector and its threshold on copies of `labels` with synthetic flips (module doc);
    `given` are the detectors of the labels as given."""
    kinds = [kind for kind in kinds if kind == "uniform" or num_classes > 2]  # two classes: every flip is uniform
    copies, flipped_scores = [], []
    for kind in kinds:
        for seed in seeds:
            flipped, moved = flip(labels, num_classes, fraction, kind, seed, given.loo_prediction)
            after = detectors(basis, f0, flipped, num_classes, recipe, tol, f"{kind} copy {seed}").scores
            before = {name: given.scores[name][moved] for name in CANDIDATES}
            paired = np.repeat([1, 0], moved.sum())  # S after the flips (positives), S before
            weight = np.where(paired == 1, 1.0, (1 - fraction) / fraction)  # positives at the copies' rate
            ap = {
                name: float(
                    average_precision_score(
                        paired, np.concatenate([after[name][moved], before[name]]), sample_weight=weight
                    )
                )
                for name in CANDIDATES
            }
            copies.append({"kind": kind, "seed": seed, "flips": int(moved.sum()), "ap": ap})
            if kind == "uniform":
                flipped_scores.append({name: after[name][moved] for name in CANDIDATES})
    mean = {name: np.mean([c["ap"][name] for c in copies]) for name in CANDIDATES}
    chosen = max(CANDIDATES, key=lambda name: mean[name])
    stability = float(np.mean([max(c["ap"], key=c["ap"].get) == chosen for c in copies]))
    real = given.scores[chosen]
    thresholds = np.unique(real)[::-1]  # descending: more flagged at each step
    q = share_at_least(real, thresholds)
    a = np.mean([share_at_least(fs[chosen], thresholds) for fs in flipped_scores], axis=0)
    pi, t, _ = error_rates(q, a, 1.0 if num_classes == 2 else 1 / (num_classes - 1))
    est_precision = np.minimum(pi * t / q, 1.0)
    reaching = np.flatnonzero(est_precision >= precision)
    if len(reaching):
        at = int(reaching[-1])  # the lowest threshold that still reaches the precision
        threshold, est_p, est_r = float(thresholds[at]), float(est_precision[at]), float(t[at])
    else:
        threshold, est_p, est_r = float("inf"), float("nan"), 0.0
    flagged = int((real >= threshold).sum())
    return Calibration(copies, chosen, stability, threshold, precision, pi, est_p, est_r, flagged)


def suspects(
    basis: Basis,
    f0: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe: Recipe,
    kinds: list[str],
    seeds: list[int],
    fraction: float,
    precision: float,
    tol: float = 1e-14,
) -> tuple[dict[str, np.ndarray], Calibration]:
    """Every training sample's suspicion (the chosen detector's score), predicted label and flag, and how
    they were chosen (`calibrate`). k = `num_outputs(num_classes)` outputs."""
    if f0.shape[1] != num_outputs(num_classes):
        raise ValueError(f"f0 has {f0.shape[1]} outputs, {num_classes} classes need {num_outputs(num_classes)}")
    given = detectors(basis, f0, labels, num_classes, recipe, tol)
    calibration = calibrate(basis, f0, labels, num_classes, recipe, given, kinds, seeds, fraction, precision, tol)
    score = given.scores[calibration.chosen]
    columns = {
        "suspicion": score,
        "predicted": predicted_labels(given.loo_prediction),
        "flagged": score >= calibration.threshold,
    }
    return columns, calibration


def baseline_flags(scores: dict[str, np.ndarray], issues: np.ndarray | None, count: int) -> dict[str, np.ndarray]:
    """The flagged set of each baseline score (module doc): cleanlab's own issue set `issues`, else the
    top `count` samples by the score (ties in sample order)."""
    flags = {}
    for name, score in scores.items():
        if name == "cleanlab" and issues is not None:
            flags[name] = np.asarray(issues, bool)
            continue
        mask = np.zeros(len(score), bool)
        mask[np.argsort(-score, kind="stable")[:count]] = True
        flags[name] = mask
    return flags


def against_known(flagged: np.ndarray, score: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """A flagged set and the ranking by `score` measured against known wrong labels `noisy`: AP, AUROC,
    precision (nan when nothing is flagged) and recall; {} without both wrong and right labels."""
    if not noisy.any() or noisy.all():
        return {}
    found = detection_metrics(score, noisy, [])
    return {
        "ap": found["ap"],
        "auroc": found["auroc"],
        "precision": float(noisy[flagged].mean()) if flagged.any() else float("nan"),
        "recall": float(noisy[flagged].sum() / noisy.sum()),
    }
