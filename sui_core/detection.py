"""Mislabel detection: sui's own detectors, the confident-learning baseline, and an honest selection.

**Why plain F-SI ranks flips well but less precisely than the loss.** Leaving sample i out of the
linearized model changes its weights by Δv_i; the change of the validation outputs is, to first
order, the sample's leave-one-out error e_i = y_i − f₋ᵢ(x_i) pushed through an influence direction:
F-SI_i ≈ ‖e_i‖² · G_i, with G_i = F-SI_i / ‖e_i‖² the F-SI per unit of leave-one-out loss (exact for
ridge regression at convergence, where Δv_i = H₋ᵢ⁻¹Φ_iᵀe_i). A flipped label makes ‖e_i‖² large;
G_i says how far the sample reaches into the function and is large for atypical, high-leverage
inputs whatever their label. On the default data G carries no label information (its AUROC for the
flips is about 0.4), so it multiplies the useful factor by noise: clean but atypical samples climb
into the top of F-SI and cost precision (AP), while the order of most flips vs most clean samples
(AUROC) barely changes. The evaluate stage measures this (`why_*` metrics).

**sui's detectors** (all from the linearized model's exact leave-one-out solution, no retraining):

- `fsi`: F-SI itself;
- `loo_loss`: ½‖y_i − f₋ᵢ(x_i)‖², the exact leave-one-out loss of the linearized model (from the
  same Δv_i: f₋ᵢ(x_i) = f_t(x_i) − Φ_iΔv_i);
- `fsi_over_leverage`: F-SI_i / h_i with h_i = tr Φ_i g(H) Φ_iᵀ the leverage of the trained
  linearized model (the diagonal of its hat matrix, ∂f_t(x_i)/∂y_i): divides out the reach of
  high-leverage samples;
- `fsi_over_leverage_multi_t`: geometric mean of F-SI/leverage at several training lengths
  (t times each `t_factors`), which averages out when each sample is fitted;
- `fsi_over_leverage_x_loo_loss`: F-SI/leverage times the leave-one-out loss.

`sui_best` is the candidate with the highest average precision on a seeded *selection* half of the
training samples, whose flips are known because they are synthetic; every method is reported on the
other half only, so the choice never sees the reported samples (nor any test label).

**Confident learning** (Northcutt et al., cleanlab): out-of-fold predicted probabilities from K-fold
real training of the network (`sui_core.training.train_full_batch`, the pipeline's recipe), then
`cleanlab.rank.get_label_quality_scores` (1 − quality ranks the samples for AUROC/AP) and
`cleanlab.filter.find_label_issues` (its own yes/no set). The networks are trained by MSE on raw
outputs, so probabilities are read off the outputs: one output (two classes) p = clip(f(x), 0, 1)
gives [1 − p, p]; k outputs are clipped to [0, 1] and renormalized (uniform where all are 0).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from sui_core.ntk import Basis
from sui_core.solver import Recipe, loo_deltas, trained_coefficients
from sui_core.training import predict, train_full_batch

SUI_DETECTORS = ("fsi", "loo_loss", "fsi_over_leverage", "fsi_over_leverage_multi_t", "fsi_over_leverage_x_loo_loss")


def linearized_quantities(basis: Basis, residual: np.ndarray, recipe: Recipe, tol: float = 1e-14) -> dict[str, np.ndarray]:
    """Per sample, for the linearized model trained by `recipe` on all n samples: `fsi_sum`
    (Σ_j ‖Φ_val,j Δv_i‖², σ-free), `loo_loss` ½‖y_i − f₋ᵢ(x_i)‖², `train_loss` ½‖y_i − f_t(x_i)‖²
    and `leverage` tr Φ_i g(H) Φ_iᵀ."""
    n = basis.z.shape[0]
    full = recipe.full(n)
    c = trained_coefficients(basis.s, basis.z, residual, full)
    train_error = residual - np.einsum("nkr,r->nk", basis.z, c)
    fsi_sum, loo_error = np.empty(n), np.empty_like(train_error)
    _, blocks = loo_deltas(basis.s, basis.z, residual, full, recipe.left_out(n), tol)
    for start, delta in blocks:
        sl = slice(start, start + len(delta))
        fsi_sum[sl] = np.einsum("br,br->b", delta @ basis.gram_val, delta)
        loo_error[sl] = train_error[sl] + np.einsum("bkr,br->bk", basis.z[sl], delta)
    leverage = np.einsum("nkr,r,nkr->n", basis.z, full.factor(basis.s), basis.z)
    return {"fsi_sum": fsi_sum, "loo_loss": 0.5 * (loo_error ** 2).sum(1),
            "train_loss": 0.5 * (train_error ** 2).sum(1), "leverage": leverage}


def sui_detectors(basis: Basis, residual: np.ndarray, recipe: Recipe, t_factors: list[float],
                  tol: float = 1e-14) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """sui's candidate detectors (see the module docstring; higher = more likely flipped) and the
    linearized quantities at the recipe's own t behind them."""
    factors = sorted(set(t_factors) | {1.0}) if math.isfinite(recipe.t) else [1.0]
    per_t = {}
    for f in factors:
        t = recipe.t * f if recipe.dynamics == "continuous" else max(1, round(recipe.t * f))
        per_t[f] = linearized_quantities(basis, residual, dataclasses.replace(recipe, t=t), tol)
    q = per_t[1.0]
    fsi = q["fsi_sum"] / (2 * basis.n_val)
    ratio = {f: (p["fsi_sum"] / (2 * basis.n_val)) / p["leverage"] for f, p in per_t.items()}
    candidates = {
        "fsi": fsi,
        "loo_loss": q["loo_loss"],
        "fsi_over_leverage": ratio[1.0],
        "fsi_over_leverage_multi_t": np.exp(np.mean([np.log(np.maximum(r, 1e-300)) for r in ratio.values()], 0)),
        "fsi_over_leverage_x_loo_loss": ratio[1.0] * q["loo_loss"],
    }
    return candidates, q


def selection_split(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask of round(fraction·n) samples used to choose a detector; the rest are reported."""
    mask = np.zeros(n, bool)
    mask[np.random.default_rng([seed, 5]).choice(n, round(fraction * n), replace=False)] = True
    return mask


def choose_detector(candidates: dict[str, np.ndarray], flagged: np.ndarray, selection: np.ndarray) -> str:
    """The candidate with the highest average precision on the selection samples (ties: the first)."""
    from sklearn.metrics import average_precision_score

    flags = np.asarray(flagged, bool)[selection]
    if flags.all() or not flags.any():
        raise ValueError("the selection samples need flipped and clean labels both to choose a detector")
    aps = {name: average_precision_score(flags, score[selection]) for name, score in candidates.items()}
    return max(aps, key=lambda name: (aps[name], -list(aps).index(name)))


def output_probabilities(outputs: np.ndarray, num_classes: int) -> np.ndarray:
    """Class probabilities (n, C) read off MSE-trained outputs (n, k): see the module docstring."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if num_classes == 2 and outputs.shape[1] == 1:
        p = np.clip(outputs[:, 0], 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)
    clipped = np.clip(outputs, 0.0, 1.0)
    total = clipped.sum(1, keepdims=True)
    return np.where(total > 0, clipped / np.where(total > 0, total, 1.0), 1.0 / num_classes)


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index of every sample: a seeded stratified K-fold split (each class spread over the folds)."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    fold = np.empty(len(labels), np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for i, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[held_out] = i
    return fold


def out_of_fold_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fold: np.ndarray, lr: float,
                        steps: int, weight_decay: float = 0.0, progress: bool | str = False) -> np.ndarray:
    """Outputs (n, k) of each sample under the network trained (from w0, by the recipe) without its
    fold: one real training per fold, all folds stepped together."""
    folds = int(fold.max()) + 1
    weights = torch.tensor(np.array([fold != i for i in range(folds)], dtype=np.float64))
    params = train_full_batch(model, x, y, weights, lr, steps, weight_decay, progress=progress)
    outputs = predict(model, params, x).to(torch.float64).numpy()  # (folds, n, k)
    return outputs[fold, np.arange(len(fold))]


def confident_learning(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's ranking score (1 − label quality: higher = more likely mislabeled) and its own set of
    label issues (boolean), from out-of-fold predicted probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    quality = get_label_quality_scores(labels, probabilities)
    issues = find_label_issues(labels, probabilities, n_jobs=1)  # its worker pool can deadlock after torch forks
    return 1.0 - quality, np.asarray(issues, bool)
