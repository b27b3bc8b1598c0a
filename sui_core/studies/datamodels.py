"""The linear datamodeling score (LDS): how well sui predicts the real network retrained on random subsets.

**Ground truth.** m subsets S_1 … S_m of the training set, each keeping round(α·n) samples (seeded), and
the real network trained on each by the recipe (full-batch gradient descent on the mean loss of the kept
samples: `train_full_batch` with 0/1 sample weights). For every target x_t of the validation set it
records one number per subset, the target output

    y_t(S) = f_S(x_t)                  one output (k = 1)
    y_t(S) = f_S(x_t)[label_t]         k outputs: the output of the target's labelled class

(TRAK scores the correct-class margin of a cross-entropy model; for the MSE-trained one-hot outputs sui
models, the labelled class's output is the same question: how much the subset supports the right answer.)

**Two predictions of the same numbers**, from the network linearized at w0, trained by the recipe:

- `group` (sui): leaving the complement G = S^c out at once changes the trained coefficients by
  Δc_G (`solver.group_delta`: the rank-|G|k downdate of the kernel, solved exactly by one r×r
  eigendecomposition), so f_S(x_t) = f_lin(x_t) − w_t Δc_G, with w_t the target's row in the basis
  (the labelled class's row for k outputs) and f_lin the linearized model trained on all samples.
- `additive` (a linear datamodel built from single-sample effects, what influence-style methods offer):
  f_S(x_t) = f_lin(x_t) − Σ_{i∈G} w_t Δc_i, the sum of the exact leave-one-out effects A[i, t].
  Removing half the data is far from removing one sample: the left-out kernels interact (the step size
  and the spectrum of the recipe change with the subset), which the sum cannot see.

**The score.** LDS = the mean over targets of the Spearman correlation, across the m subsets, between the
real y_t(S) and the predicted one (Park et al. 2023). Targets whose real outputs do not vary across the
subsets have no correlation and are left out of the mean (counted in `DatamodelScore.targets`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm import tqdm

from sui_core import plots
from sui_core.io import write_parquet
from sui_core.linearized.ntk import Basis
from sui_core.linearized.rows import residual_contraction
from sui_core.linearized.solver import Recipe, group_delta, loo_deltas, trained_coefficients
from sui_core.network.training import predict, train_full_batch


@dataclass
class DatamodelScore:
    """Real and predicted target outputs for every subset, and the LDS of each prediction."""

    kept: np.ndarray  # (m, n) bool: the training samples each subset keeps
    real: np.ndarray  # (m, T) y_t(S) of the real network trained on each subset
    predicted: dict[str, np.ndarray]  # name -> (m, T): "group" (exact removal of the complement), "additive"
    seconds: dict[str, float]  # "retraining" and each prediction's own time

    def per_target(self, name: str) -> np.ndarray:
        """(T,) Spearman across subsets of each target (nan where the real or the predicted outputs are constant)."""
        return np.array([_spearman(self.real[:, t], self.predicted[name][:, t]) for t in range(self.real.shape[1])])

    def lds(self, name: str) -> float:
        values = self.per_target(name)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    @property
    def targets(self) -> int:
        """Targets that enter the mean: the real output varies across the subsets."""
        return int((np.ptp(self.real, axis=0) > 0).sum())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def random_subsets(n: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """(m, n) bool: m seeded subsets, each keeping round(fraction·n) of the n samples (at least 1, at most n − 1)."""
    if m < 2:
        raise ValueError(f"a rank correlation across subsets needs at least 2 subsets, got {m}")
    if not 0 < fraction < 1:
        raise ValueError(f"the kept fraction must lie strictly between 0 and 1, got {fraction}")
    size = min(max(round(fraction * n), 1), n - 1)
    rng = np.random.default_rng([seed, 5])
    kept = np.zeros((m, n), dtype=bool)
    for row in kept:
        row[rng.choice(n, size, replace=False)] = True
    return kept


def target_rows(rows: np.ndarray, label: np.ndarray | None) -> np.ndarray:
    """(T, ...) the target output's part of per-output arrays (T, k, ...): output 0 for k = 1, else the
    labelled class (`label` may be None only for k = 1)."""
    if rows.shape[1] == 1:
        return rows[:, 0]
    if label is None:
        raise ValueError(f"targets with {rows.shape[1]} outputs need their labels to pick the output")
    return rows[np.arange(len(rows)), np.asarray(label)]


def real_subset_outputs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_targets: torch.Tensor,
    target_label: np.ndarray | None,
    kept: np.ndarray,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    progress: bool = False,
) -> np.ndarray:
    """(m, T) target outputs of the real network trained by the recipe on each subset (rows of `kept`),
    one run per subset on its kept rows only (half the work of 0/1 weights over all rows at α = ½)."""
    outputs = []
    for row in tqdm(kept, desc="lds retrain", unit="subset", disable=not progress, leave=False):
        idx = torch.as_tensor(np.flatnonzero(row))
        params = train_full_batch(model, x[idx], y[idx], torch.ones(1, len(idx)), lr, steps, weight_decay)
        outputs.append(target_rows(predict(model, params, x_targets)[0].double().numpy(), target_label))
    return np.stack(outputs)


def linearized_subset_outputs(
    basis: Basis,
    residual: np.ndarray,
    recipe: Recipe,
    f0_targets: np.ndarray,
    rows: np.ndarray,
    target_label: np.ndarray | None,
    kept: np.ndarray,
    tol: float = 1e-14,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The `group` and `additive` predictions (module doc), (m, T) each, and their seconds.
    f0_targets (T, k): outputs at w0; rows W (T, k, r): the targets' rows in the basis."""
    n = basis.z.shape[0]
    w = target_rows(rows, target_label)  # (T, r)
    rhs = residual_contraction(basis.z, residual)
    full = target_rows(f0_targets, target_label) + w @ trained_coefficients(basis.s, basis.z, residual, recipe.full(n))
    started = time.perf_counter()
    group = np.stack(
        [full - w @ group_delta(basis.s, basis.z, residual, recipe, np.flatnonzero(~row), rhs) for row in kept]
    )
    group_seconds = time.perf_counter() - started
    started = time.perf_counter()
    delta_sum = np.zeros((len(kept), basis.rank))
    _, blocks = loo_deltas(basis.s, basis.z, residual, recipe.full(n), recipe.left_out(n), tol)
    for start, delta in blocks:
        delta_sum += (~kept[:, start : start + len(delta)]).astype(np.float64) @ delta
    additive = full[None, :] - delta_sum @ w.T
    return {"group": group, "additive": additive}, {"group": group_seconds, "additive": time.perf_counter() - started}


def datamodel_score(
    model: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    x_targets: torch.Tensor,
    target_label: np.ndarray | None,
    basis: Basis,
    residual: np.ndarray,
    recipe: Recipe,
    m: int,
    fraction: float,
    seed: int = 0,
    progress: bool = False,
) -> DatamodelScore:
    """The LDS comparison (module doc) for a network at w0 and its linearization there (`basis` with
    `val_rows` for the targets, `residual` = y − f0 of the training samples). Computed in the model's dtype."""
    if basis.val_rows is None or basis.val_rows.shape[0] != len(x_targets):
        raise ValueError("the basis must hold the targets' rows (val_rows), one per target")
    kept = random_subsets(len(x), m, fraction, seed)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        f0_targets = model.eval()(x_targets.to(dtype)).double().numpy()
    predicted, seconds = linearized_subset_outputs(
        basis, residual, recipe, f0_targets, basis.val_rows, target_label, kept
    )
    started = time.perf_counter()
    real = real_subset_outputs(
        model,
        x.to(dtype),
        torch.as_tensor(np.asarray(y), dtype=dtype),
        x_targets.to(dtype),
        target_label,
        kept,
        recipe.lr,
        int(recipe.t),
        recipe.weight_decay,
        progress,
    )
    seconds["retraining"] = time.perf_counter() - started
    return DatamodelScore(kept, real, predicted, seconds)


def write_report(score: DatamodelScore, sample_id: np.ndarray, target_id: np.ndarray, out: Path) -> dict[str, float]:
    """lds.parquet (one row per subset and target: real and predicted outputs), lds_subsets.parquet (the
    training samples each subset keeps), lds.md and plots/lds_per_target.png under `out`; returns the
    metrics (lds_<prediction>, targets, seconds)."""
    m, t = score.real.shape
    columns = {
        "subset": np.repeat(np.arange(m), t),
        "target_id": np.tile(np.asarray(target_id), m),
        "real": score.real.reshape(-1),
        **{name: values.reshape(-1) for name, values in score.predicted.items()},
    }
    write_parquet(out / "lds.parquet", pa.table(columns))
    subset, member = np.nonzero(score.kept)
    write_parquet(out / "lds_subsets.parquet", pa.table({"subset": subset, "sample_id": np.asarray(sample_id)[member]}))
    lds = {name: score.lds(name) for name in score.predicted}
    lines = ["| prediction | LDS | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {score.seconds[name]:.2f} |" for name, value in lds.items()]
    lines.append(
        f"\n{m} subsets keeping {int(score.kept[0].sum())} of {score.kept.shape[1]} samples, {score.targets} targets; "
        f"real retraining {score.seconds['retraining']:.1f} s\n"
    )
    (out / "lds.md").write_text("\n".join(lines))
    plots.paired(
        score.per_target("additive"),
        score.per_target("group"),
        out / "plots" / "lds_per_target.png",
        "Spearman across subsets: additive (sum of leave-one-out effects)",
        "exact group removal (sui)",
        f"LDS per target: group {lds['group']:.3f}, additive {lds['additive']:.3f}",
    )
    return {
        **{f"lds_{name}": value for name, value in lds.items()},
        "lds_subsets": m,
        "lds_targets": score.targets,
        "lds_retrain_seconds": score.seconds["retraining"],
    }
