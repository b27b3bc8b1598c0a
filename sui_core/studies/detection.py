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

**sui's detectors** (from the linearized model's exact leave-one-out solution, no retraining; the
loo stage writes the fit of every sample, `sui_core.linearized.scores.FIT`, and the score table carries it):

- `fsi`: F-SI itself;
- `loo_loss`: ½‖y_i − f₋ᵢ(x_i)‖², the exact leave-one-out loss of the linearized model (from the
  same Δv_i: f₋ᵢ(x_i) = f_t(x_i) − Φ_iΔv_i);
- `fsi_over_leverage`: F-SI_i / h_i with h_i = tr Φ_i g(H) Φ_iᵀ the leverage of the trained
  linearized model (the diagonal of its hat matrix, ∂f_t(x_i)/∂y_i): divides out the reach of
  high-leverage samples;
- `fsi_over_leverage_multi_t`: geometric mean of F-SI/leverage at several training lengths
  (t times each `t_factors`), which averages out when each sample is fitted;
- `fsi_over_leverage_x_loo_loss`, `fsi_over_leverage_x_train_loss`: F-SI/leverage times the
  linearized model's leave-one-out or training loss: how unique the sample is per unit of reach, times
  how badly it is fitted;
- `fsi_over_leverage_x_loss` (only when the evaluate stage trains the real network for the `loss`
  baseline): F-SI/leverage times the trained real network's loss, which fits the flips less than the
  linearized model does (measured: the real loss alone has a higher AP than the linearized losses).

`sui_best` is the candidate with the highest average precision on one seeded half of the training
samples, whose flips are known because they are synthetic, and is reported on the other half only, so
the choice never sees the reported samples (nor any test label). `cross_selected` does this both ways
(choose on half a, report on half b; choose on b, report on a) and averages the two folds, so every
sample is reported once and every method is compared on the same samples.

**Confident learning** (Northcutt et al., cleanlab): out-of-fold predicted probabilities from K-fold
real training of the network (`sui_core.network.training.train_full_batch`, the pipeline's recipe), then
`cleanlab.rank.get_label_quality_scores` (1 − quality ranks the samples for AUROC/AP) and
`cleanlab.filter.find_label_issues` (its own yes/no set). The networks are trained by MSE on raw
outputs, so probabilities are read off the outputs: one output (two classes) p = clip(f(x), 0, 1)
gives [1 − p, p]; k outputs are clipped to [0, 1] and renormalized (uniform where all are 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from sui_core.linearized.ntk import Basis
from sui_core.linearized.scores import loo_quadratic_forms
from sui_core.linearized.solver import Recipe
from sui_core.studies.evaluation import detection_metrics

if TYPE_CHECKING:  # torch only where a real network trains (out_of_fold_outputs): seconds of import
    import torch
    from torch import nn

SUI_DETECTORS = (
    "fsi",
    "loo_loss",
    "fsi_over_leverage",
    "fsi_over_leverage_multi_t",
    "fsi_over_leverage_x_loo_loss",
    "fsi_over_leverage_x_train_loss",
)
# candidates that also need the trained real network's loss (`detection.baselines` has `loss`)
WITH_LOSS = ("fsi_over_leverage_x_loss",)


def other_lengths(recipe: Recipe, t_factors: list[float]) -> list[Recipe]:
    """The recipe at t times each factor other than 1 (none for t = ∞: every length is converged)."""
    if not math.isfinite(recipe.t):
        return []
    return [
        dataclasses.replace(recipe, t=recipe.t * f if recipe.dynamics == "continuous" else max(1, round(recipe.t * f)))
        for f in sorted(set(t_factors) - {1.0})
    ]


def linearized_fit(basis: Basis, residual: np.ndarray, recipe: Recipe, tol: float = 1e-14) -> tuple[np.ndarray, dict]:
    """F-SI (σ = 1) and the fit (`sui_core.linearized.scores.FIT`) of every sample for the linearized model
    trained by `recipe`: the loo stage's solve at another training length."""
    progress = f"leave-one-out at t = {recipe.t:g}"  # as long as the loo stage's solve: minutes at large n
    result = loo_quadratic_forms(basis, residual, recipe, None, tol, progress=progress, wanted=("fsi_sum",))
    return result.forms["fsi_sum"] / (2 * basis.n_val), result.fit


def sui_detectors(
    fsi: np.ndarray,
    fit: dict[str, np.ndarray],
    others: list[tuple[np.ndarray, dict]] = (),
    loss: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """sui's candidate detectors (see the module docstring; higher = more likely flipped) from F-SI and
    the fit at the recipe's t (the score table), F-SI and fit at other training lengths (`others`, from
    `linearized_fit`) and, when given, the trained real network's loss (adds `WITH_LOSS`). Only their
    order matters: F-SI's unit (σ) may differ between t and the others."""
    ratio = fsi / fit["leverage"]
    ratios = [ratio] + [other_fsi / other_fit["leverage"] for other_fsi, other_fit in others]
    candidates = {
        "fsi": fsi,
        "loo_loss": fit["loo_loss"],
        "fsi_over_leverage": ratio,
        "fsi_over_leverage_multi_t": np.exp(np.mean([np.log(np.maximum(r, 1e-300)) for r in ratios], 0)),
        "fsi_over_leverage_x_loo_loss": ratio * fit["loo_loss"],
        "fsi_over_leverage_x_train_loss": ratio * fit["train_loss"],
    }
    if loss is not None:
        candidates["fsi_over_leverage_x_loss"] = ratio * loss
    return candidates


def selection_split(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask of round(fraction·n) samples: half a of `cross_selected` (the rest is half b)."""
    mask = np.zeros(n, bool)
    mask[np.random.default_rng([seed, 5]).choice(n, round(fraction * n), replace=False)] = True
    return mask


def choose_detector(candidates: dict[str, np.ndarray], flagged: np.ndarray, selection: np.ndarray) -> str:
    """The candidate with the highest average precision on the `selection` samples (ties: the first)."""
    from sklearn.metrics import average_precision_score

    flags = np.asarray(flagged, bool)[selection]
    if flags.all() or not flags.any():
        raise ValueError("the selection samples need flipped and clean labels both to choose a detector")
    aps = {name: average_precision_score(flags, score[selection]) for name, score in candidates.items()}
    return max(aps, key=lambda name: (aps[name], -list(aps).index(name)))


def cross_selected(
    candidates: dict[str, np.ndarray],
    others: dict[str, np.ndarray],
    flagged: np.ndarray,
    half_a: np.ndarray,
    top_fractions: list[float],
) -> tuple[dict, dict, dict]:
    """Two-fold honest evaluation of sui's best detector beside every other method: choose the best
    candidate on half a and report all methods on half b, then choose on half b and report on half a.

    Returns (rows, folds, chosen): rows[method] the mean of the two folds' `detection_metrics`
    (`sui_best` included: each half scored by the candidate chosen on the other half), folds["a"|"b"]
    the rows of the fold that chose on that half, chosen["a"|"b"] the candidate chosen on that half.
    """
    flagged = np.asarray(flagged, bool)
    methods = {**candidates, **others}
    folds, chosen = {}, {}
    for fold, choose in (("a", half_a), ("b", ~half_a)):
        chosen[fold] = choose_detector(candidates, flagged, choose)
        report = ~choose
        rows = {
            name: detection_metrics(score[report], flagged[report], top_fractions) for name, score in methods.items()
        }
        rows["sui_best"] = rows[chosen[fold]]
        folds[fold] = rows
    rows = {
        name: {key: (folds["a"][name][key] + folds["b"][name][key]) / 2 for key in folds["a"][name]}
        for name in folds["a"]
    }
    return rows, folds, chosen


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


def out_of_fold_outputs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    fold: np.ndarray,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    progress: bool | str = False,
) -> np.ndarray:
    """Outputs (n, k) of each sample under the network trained (from w0, by the recipe) without its
    fold: one real training per fold, all folds stepped together."""
    import torch

    from sui_core.network.training import predict, train_full_batch

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


def out_of_fold_confident_learning(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    folds: int,
    seed: int,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    progress: bool | str = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole cleanlab baseline: seeded stratified folds, out-of-fold outputs of the recipe's real
    training, probabilities read off them, then `confident_learning` (ranking score, issue set)."""
    fold = fold_assignment(labels, folds, seed)
    outputs = out_of_fold_outputs(model, x, y, fold, lr, steps, weight_decay, progress=progress)
    return confident_learning(labels, output_probabilities(outputs, num_classes))
