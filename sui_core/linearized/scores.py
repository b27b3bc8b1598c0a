"""Per-sample unique information from the leave-one-out weight changes Δv_i (in the eigenbasis).

All scores are KL divergences in nats between Gaussians smoothed with noise scale σ (default 1):

- F-SI_i = Σ_j ‖Φ_val,j Δv_i‖² / (2σ² n_val)                      (function space, eq. 16/17)
- SI_i isotropic = ‖Δv_i‖² / (2σ²)                                 (Σ = σ² I)
- SI_i hessian   = (b / (lr σ²)) Δv_iᵀ H̄ Δv_i                      (Langevin, eq. 15: Σ⁻¹ = 2b H̄/(lr σ²))
- SI_i sgd       = ½ Δv_iᵀ Σ⁺ Δv_i, H̄Σ + ΣH̄ = (lr/b) Λ              (SGD steady state, eq. 14)

H̄ = H/n is the Hessian of the *mean* loss and lr, b (batch size) the PyTorch-side recipe, since
that is the SGD whose noise these smoothings model (written with the sum-loss η = lr/n and H, as
in DESIGN.md, the Hessian form reads (b/(ησ²))ΔvᵀHΔv/n²: the same scores, with σ² measured against
the mean-loss gradient); Λ is the covariance of the per-sample gradients
at the trained solution. In H̄'s eigenbasis the Lyapunov equation is solved entry by entry:
Σ_ab = (lr/b) Λ_ab / (h_a + h_b). Directions that the SGD noise never reaches (Σ singular) would make
the KL infinite; the pseudo-inverse ignores them.

`loo_quadratic_forms` runs the solver once and keeps, per sample, the σ-free quadratic forms; the
score stage turns them into nats with `scores_from_forms`, so changing σ does not rerun the solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from sui_core.data.splits import Split
from sui_core.linearized.ntk import Basis
from sui_core.linearized.rows import residual_contraction, rows_times
from sui_core.linearized.solver import (
    DIRECT_MIN_K,
    Recipe,
    SolverPlan,
    group_delta,
    left_out_block_size,
    loo_deltas,
    trained_coefficients,
)

FORMS = ("fsi_sum", "dv_sq", "dv_hess", "dv_sgd")
SCORES = ("fsi", "si_isotropic", "si_hessian", "si_sgd")
# How the linearized model fits each sample, from the same solve: ½‖y_i − f₋ᵢ(x_i)‖² (leave-one-out),
# ½‖y_i − f_t(x_i)‖² (trained on all) and the leverage tr Φ_i g(H) Φ_iᵀ (∂f_t(x_i)/∂y_i, the diagonal
# of the hat matrix); the mislabel detectors of sui_core.studies.detection are built from them.
FIT = ("loo_loss", "train_loss", "leverage")


@dataclass
class LooResult:
    forms: dict[str, np.ndarray]  # FORMS, each (n,)
    fit: dict[str, np.ndarray]  # FIT, each (n,)
    plan: SolverPlan
    train_mse: float  # ½·mean‖f_t(x_i) − y_i‖² of the linearized model trained on all samples
    loo_error: np.ndarray  # (n, k) y_i − f₋ᵢ(x_i): the leave-one-out model's error on the sample left out

    def record(self, recipe: Recipe, n: int, n_val: int) -> dict:
        """What the forms were solved with, for their meta.json: the solver plan, both recipes, the fit."""
        return {
            "plan": self.plan.as_dict(),
            "full": vars(recipe.full(n)),
            "left_out": vars(recipe.left_out(n)),
            "n_val": n_val,
            "train_mse": self.train_mse,
            "units": "squared weights/outputs, σ-free",
        }


def planned_peak_bytes(n: int, k: int, r: int, block_size: int) -> int:
    """What `loo_quadratic_forms` holds at its peak, in bytes: Z, the r×r matrices (F-SI metric, SGD
    covariance and its eigenvectors, precision) and one block of deltas and of the Chebyshev
    recurrence's work (the moments ν, or for k ≥ DIRECT_MIN_K the r-vectors and the block of Z)."""
    b = left_out_block_size(k, r, block_size)
    work = b * (6 + k) * r if k >= DIRECT_MIN_K else 2 * b * k * k * r
    return 8 * (n * k * r + 5 * r * r + 4 * b * r + work)


def sgd_precision(
    basis: Basis,
    residual: np.ndarray,
    recipe: Recipe,
    batch_size: int,
    c: np.ndarray,
    block_size: int = 4096,
    samples: range | None = None,
    all_reduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Σ⁺ of the SGD steady state in the eigenbasis (r×r), at the trained coefficients `c`
    (`sui_core.linearized.solver.trained_coefficients`).

    Distributed: each worker sums the gradient moments over its own `samples` and `all_reduce` (a sum
    over workers, e.g. `stages.distributed.all_reduce_sum`) adds them up; without it `samples` must
    be all of them.
    """
    n = basis.z.shape[0]
    samples = samples if samples is not None else range(n)
    if all_reduce is None and samples != range(n):
        raise ValueError("sgd_precision over a part of the samples needs all_reduce to sum the parts")
    r = basis.rank
    second = np.zeros((r, r))
    mean = np.zeros(r)
    for start in range(samples.start, samples.stop, block_size):
        stop = min(start + block_size, samples.stop)
        zb = basis.z[start:stop]
        err = np.einsum("bkr,r->bk", zb, c) - residual[start:stop]
        grads = np.einsum("bkr,bk->br", zb, err)  # per-sample gradients, up to a constant shift
        second += grads.T @ grads
        mean += grads.sum(0)
    if all_reduce is not None:
        summed = all_reduce(np.concatenate([second.ravel(), mean]))
        second, mean = summed[: r * r].reshape(r, r), summed[r * r :]
    mean = mean / n
    cov = second / n - np.outer(mean, mean)
    h = basis.s / n + recipe.weight_decay
    denom = h[:, None] + h[None, :]
    sigma = np.divide((recipe.lr / batch_size) * cov, denom, out=np.zeros_like(cov), where=denom > 0)
    evals, evecs = np.linalg.eigh((sigma + sigma.T) / 2)
    keep = evals > 1e-12 * max(evals.max(initial=0.0), 1e-300)
    return (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T


def loo_quadratic_forms(
    basis: Basis,
    residual: np.ndarray,
    recipe: Recipe,
    batch_size: int | None,
    tol: float = 1e-14,
    block_size: int = 256,
    dtype: str = "float64",
    progress: bool | str = True,
    samples: range | None = None,
    all_reduce: Callable[[np.ndarray], np.ndarray] | None = None,
    wanted: tuple[str, ...] = FORMS,
) -> LooResult:
    """Solve the leave-one-out problems of `samples` (default all) exactly and keep the quadratic
    forms `wanted` (default all FORMS) behind each score, and the fit; arrays are indexed like `samples`.
    `progress`: show a progress bar (a string: with that description instead of "leave-one-out").

    A distributed worker passes its own `samples` and `all_reduce` (a sum over workers): the SGD
    smoothing's gradient covariance, a sum over all samples, is then summed over the workers' shares
    (without `all_reduce` every worker sums it over all samples itself). Without dv_sgd in `wanted`
    that covariance and its r×r eigendecomposition are skipped (most of a solve's time at small n)."""
    n = basis.z.shape[0]
    samples = samples if samples is not None else range(n)
    full, left = recipe.full(n), recipe.left_out(n)
    plan, blocks = loo_deltas(basis.s, basis.z, residual, full, left, tol, block_size, dtype, samples)
    c = trained_coefficients(basis.s, basis.z, residual, full)
    if "dv_sgd" in wanted:
        sgd_prec = sgd_precision(
            basis,
            residual,
            recipe,
            batch_size or n,
            c,
            samples=samples if all_reduce is not None else None,
            all_reduce=all_reduce,
        )
    h_mean = basis.s / n + recipe.weight_decay
    factor = full.factor(basis.s)
    train_error = residual - rows_times(basis.z, c)  # y − f_t(x)
    forms = {name: np.empty(len(samples)) for name in wanted}
    fit = {name: np.empty(len(samples)) for name in FIT}
    loo_errors = np.empty((len(samples), basis.z.shape[1]))
    desc = progress if isinstance(progress, str) else "leave-one-out"
    with tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress) as bar:
        for start, delta in blocks:
            sl = slice(start - samples.start, start - samples.start + len(delta))
            zb, error = basis.z[start : start + len(delta)], train_error[start : start + len(delta)]
            for name in wanted:
                if name == "fsi_sum":
                    forms[name][sl] = np.einsum("br,br->b", delta @ basis.gram_val, delta)
                elif name == "dv_sq":
                    forms[name][sl] = np.einsum("br,br->b", delta, delta)
                elif name == "dv_hess":
                    forms[name][sl] = np.einsum("br,r,br->b", delta, h_mean, delta)
                else:
                    forms[name][sl] = np.einsum("br,br->b", delta @ sgd_prec, delta)
            loo_errors[sl] = error + np.einsum("bkr,br->bk", zb, delta)  # y − f₋ᵢ(x) = y − f_t(x) + Φ_iΔv_i
            fit["loo_loss"][sl] = 0.5 * (loo_errors[sl] ** 2).sum(1)
            fit["train_loss"][sl] = 0.5 * (error**2).sum(1)
            fit["leverage"][sl] = np.einsum("bkr,r,bkr->b", zb, factor, zb)
            bar.update(len(delta))
    train_mse = float(0.5 * np.mean(np.sum(train_error**2, -1)))
    return LooResult(forms, fit, plan, train_mse, loo_errors)


def group_quadratic_forms(
    basis: Basis, residual: np.ndarray, recipe: Recipe, groups: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """F-SI's and SI isotropic's σ-free forms for leaving each group of samples out at once."""
    out, rhs = {}, residual_contraction(basis.z, residual)
    for name, members in groups.items():
        delta = group_delta(basis.s, basis.z, residual, recipe, members, rhs)
        out[name] = {
            "size": len(members),
            "fsi_sum": float(delta @ basis.gram_val @ delta),
            "dv_sq": float(delta @ delta),
        }
    return out


def scores_from_forms(
    forms: dict[str, np.ndarray], n_val: int, sigma: float, lr: float, batch_size: int
) -> dict[str, np.ndarray]:
    """Nats, for smoothing noise scale σ (see the module docstring)."""
    s2 = sigma**2
    return {
        "fsi": forms["fsi_sum"] / (2 * s2 * n_val),
        "si_isotropic": forms["dv_sq"] / (2 * s2),
        "si_hessian": forms["dv_hess"] * batch_size / (lr * s2),
        "si_sgd": forms["dv_sgd"] / 2,
    }


def forms_table(parts: list[LooResult], sample_id: np.ndarray) -> pa.Table:
    """One row per sample (`sample_id`, in order): the forms and fit of the parts each process solved."""
    columns = {name: np.concatenate([part.forms[name] for part in parts]) for name in parts[0].forms}
    columns |= {name: np.concatenate([part.fit[name] for part in parts]) for name in parts[0].fit}
    return pa.table({"sample_id": sample_id, **columns})


def group_table(
    basis: Basis, residual: np.ndarray, train: Split, recipe: Recipe, columns: list[str], fsi_sum: np.ndarray
) -> pa.Table:
    """Leave each class / source / group out at once (the `loo.groups` columns of the training split),
    beside the sum of its members' own F-SI forms: unique information is not additive."""
    values = {
        "label": np.asarray(train.class_names, dtype=object)[train.label],
        "source": train.source,
        "group": train.group,
    }
    groups = {}
    for column in columns:
        column_values = np.array([None if v is None else str(v) for v in values[column]], dtype=object)
        for value in sorted({v for v in column_values if v is not None}):
            members = np.flatnonzero(column_values == value)
            if len(members) < len(column_values):  # leaving everything out is no model at all
                groups[(column, value)] = members
    forms = group_quadratic_forms(basis, residual, recipe, dict(enumerate(groups.values())))
    rows = [
        {"column": column, "group": value, **forms[i], "members_fsi_sum": float(fsi_sum[members].sum())}
        for i, ((column, value), members) in enumerate(groups.items())
    ]
    schema = pa.schema(
        [
            ("column", pa.string()),
            ("group", pa.string()),
            ("size", pa.int64()),
            ("fsi_sum", pa.float64()),
            ("dv_sq", pa.float64()),
            ("members_fsi_sum", pa.float64()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def score_table(
    forms: pa.Table, train: Split, n_val: int, sigma: float, lr: float, batch_size: int
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The score stage's table: each training sample's scores (nats) and F-SI rank beside its labels, flags,
    source, group and the loo stage's fit columns (`forms`, in `train`'s order); and the scores alone."""
    n = forms.num_rows
    scores = scores_from_forms({name: forms.column(name).to_numpy() for name in FORMS}, n_val, sigma, lr, batch_size)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-scores["fsi"], kind="stable")] = np.arange(1, n + 1)
    table = pa.table(
        {
            "sample_id": forms.column("sample_id"),
            "label": train.label,
            "clean_label": train.clean_label,
            "noisy": train.noisy,
            "source": train.source,
            "group": pa.array(train.group.tolist(), pa.string()),
            **scores,
            "rank_fsi": rank,
            **{name: forms.column(name) for name in FIT},
        }
    )
    if train.adversarial is not None:  # data.adversarial: which images are FGSM examples
        table = table.append_column("adversarial", pa.array(train.adversarial, pa.bool_()))
    if train.text is not None:  # a text source (data.text_column): the raw texts, last column
        table = table.append_column("text", pa.array(train.text.tolist(), pa.string()))
    return table, scores


def group_scores(groups: pa.Table, n_val: int, sigma: float) -> pa.Table:
    """F-SI of leaving each group out at once (the loo stage's group forms), beside the sum of its members'
    F-SI (nats)."""
    groups = groups.to_pydict()
    scale = 1 / (2 * sigma**2 * n_val)
    return pa.table(
        {
            "column": groups["column"],
            "group": groups["group"],
            "size": groups["size"],
            "fsi_group": [v * scale for v in groups["fsi_sum"]],
            "fsi_members_sum": [v * scale for v in groups["members_fsi_sum"]],
        }
    )


@dataclass
class OutputSubspace:
    """The m validation-output directions that carry most of the linearized leave-one-out changes, and
    each sample's linearized change in them (the `trained` estimator follows these directions through
    the real run and keeps the linearized change outside them)."""

    directions: np.ndarray  # (m, n_val, k) orthonormal
    linearized: np.ndarray  # (n, m) u_a · Δf_val,i of the linearized model
    self_change: np.ndarray  # (n, k) Φ_i Δv_i = f_t(x_i) − f₋ᵢ(x_i) of the linearized model
    captured: float  # share of Σ_i ‖Δf_val,i‖² inside the span of the directions


def output_subspace(
    basis: Basis,
    val_rows: np.ndarray,
    residual: np.ndarray,
    recipe: Recipe,
    m: int,
    tol: float = 1e-14,
    block_size: int = 256,
    dtype: str = "float64",
) -> OutputSubspace:
    """The top-m left singular directions of the linearized change matrix Δf_val = W [Δc_1 … Δc_n]
    (W = `val_rows` (n_val, k, r), Δc_i the leave-one-out deltas in the basis), from two passes of the
    solver: the first sums C = Σ_i Δc_iΔc_iᵀ (r×r), since Δf_val Δf_valᵀ = W C Wᵀ = (W C^½)(W C^½)ᵀ, whose
    left singular vectors are the directions; the second projects every Δf_val,i on them."""
    n, k, r = basis.z.shape
    w = val_rows.reshape(-1, r)

    def deltas():
        _, blocks = loo_deltas(basis.s, basis.z, residual, recipe.full(n), recipe.left_out(n), tol, block_size, dtype)
        return blocks

    second = np.zeros((r, r))
    for _, delta in deltas():
        second += delta.T @ delta
    evals, evecs = np.linalg.eigh(second)
    left, singular, _ = np.linalg.svd(w @ (evecs * np.sqrt(np.maximum(evals, 0.0))), full_matrices=False)
    m = min(m, len(singular))
    energy = singular**2
    to_directions = left[:, :m].T @ w  # (m, r)
    linearized = np.empty((n, m))
    self_change = np.empty((n, k))
    for start, delta in deltas():
        linearized[start : start + len(delta)] = delta @ to_directions.T
        self_change[start : start + len(delta)] = np.einsum("bkr,br->bk", basis.z[start : start + len(delta)], delta)
    captured = float(energy[:m].sum() / energy.sum()) if energy.sum() > 0 else 1.0
    return OutputSubspace(left[:, :m].T.reshape(m, -1, k), linearized, self_change, captured)


def trained_forms(
    forms: dict[str, np.ndarray],
    fit: dict[str, np.ndarray],
    subspace: OutputSubspace,
    run_projections: np.ndarray,
    real_error: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The `trained` estimator's forms and fit from the linearized ones (all indexed by sample).

    F-SI: Σ_j ‖Δf_val,j‖² = ‖Uᵀ Δf_val‖² + ‖(I − UUᵀ) Δf_val‖²: the first part from the real run
    (`run_projections` (m, n), sui_core.network.trajectory), the second from the linearized model
    (its total minus its part in the span; ≥ 0 up to rounding). The SI forms (weight space) stay
    linearized: following every weight through the run would take one reverse pass per weight.
    Fit: `real_error` (n, k) = y − f(x) of the real trained network gives the training loss; the
    leave-one-out loss adds the linearized self-change, y − f₋ᵢ(x_i) ≈ (y − f(x_i)) + Φ_iΔv_i; the
    leverage stays linearized."""
    outside = np.maximum(forms["fsi_sum"] - (subspace.linearized**2).sum(1), 0.0)
    trained = dict(forms, fsi_sum=outside + (np.asarray(run_projections, dtype=np.float64) ** 2).sum(0))
    real_fit = dict(
        fit,
        train_loss=0.5 * (real_error**2).sum(1),
        loo_loss=0.5 * ((real_error + subspace.self_change) ** 2).sum(1),
    )
    return trained, real_fit
