"""The whole estimate in memory: network at w0 + data → per-sample scores, without files or DVC.

The pipeline's stages do the same steps through Parquet shards and a saved basis; experiments that
score many variants (summarization that re-scores after each removal, robustness across seeds and
architectures, validation against retraining) call `unique_information` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sui_core.config import JacobianConfig
from sui_core.linearized.factors import Factors, batch_factors, factor_layout, kernel, model_projector
from sui_core.linearized.jacobians import jacobian_shapes, projected_batches
from sui_core.linearized.ntk import Basis, basis_from_kernels, build_basis, val_rows_from_cross, val_rows_in_basis
from sui_core.linearized.scores import (
    loo_quadratic_forms,
    output_subspace,
    scores_from_forms,
    trained_forms,
)
from sui_core.linearized.solver import Recipe
from sui_core.network.training import predict, train_full_batch
from sui_core.network.trajectory import loo_along_run


@dataclass
class Estimate:
    scores: dict[str, np.ndarray]  # fsi, si_isotropic, si_hessian, si_sgd: (n,) nats
    forms: dict[str, np.ndarray]  # σ-free quadratic forms (fsi_sum = Σ_j ‖Δf_val,j‖², dv_sq = ‖Δw‖²)
    fit: dict[str, np.ndarray]  # sui_core.linearized.scores.FIT: leave-one-out loss, training loss, leverage
    basis: Basis
    f0: np.ndarray  # (n, k) outputs at w0
    train_mse: float


def projected_jacobians(
    model: nn.Module, x: torch.Tensor, cfg: JacobianConfig, batch_size: int = 64, dtype: torch.dtype = torch.float64
) -> tuple[np.ndarray, np.ndarray]:
    """f0 (n, k) float64 and projected Jacobians Φ (n, k, D) at the model's current weights, in `dtype`
    (float32 halves the memory of a large unprojected Φ; build_basis multiplies in float64 anyway)."""
    projector = model_projector(cfg, model, tuple(x.shape[1:]))
    with torch.no_grad():
        f0s, phis = zip(*projected_batches(model, x, projector, 0, len(x), batch_size, dtype))
    return np.concatenate(f0s), np.concatenate(phis)


@dataclass
class Linearization:
    """The network linearized at w0, for every training sample: f0 and what the basis is built from —
    the exact kernels Θ(train, train), Θ(val, train) (`jacobian.projection: exact`, from layer factors)
    or the projected Jacobians Φ, Φ_val. `estimate(y, recipe, rows)` scores any subset of the rows
    without computing Jacobians again."""

    f0: np.ndarray  # (n, k)
    dim: int  # trained parameters (exact) or D
    kernel: np.ndarray | None = None  # (nk, nk)
    cross: np.ndarray | None = None  # (n_val·k, nk)
    phi: np.ndarray | None = None  # (n, k, D)
    phi_val: np.ndarray | None = None  # (n_val, k, D)

    def basis(self, rows: np.ndarray | None = None) -> Basis:
        """The eigenbasis of the training rows `rows` (default all); exact kernels keep val_rows."""
        n, k = self.f0.shape
        rows = np.arange(n) if rows is None else np.asarray(rows)
        if self.kernel is None:
            return build_basis(lambda: [self.phi[rows]], lambda: [self.phi_val], len(rows), k, self.dim)
        cols = (rows[:, None] * k + np.arange(k)).reshape(-1)
        n_val = self.cross.shape[0] // k
        return basis_from_kernels(self.kernel[np.ix_(cols, cols)], self.cross[:, cols], len(rows), k, n_val, self.dim)

    def estimate(
        self,
        y: np.ndarray,
        recipe: Recipe,
        rows: np.ndarray | None = None,
        sigma: float = 1.0,
        batch_size: int | None = None,
        tol: float = 1e-14,
    ) -> Estimate:
        """Exact leave-one-out scores of the training rows `rows` (default all; y holds their targets)."""
        f0 = self.f0 if rows is None else self.f0[rows]
        basis = self.basis(rows)
        residual = np.asarray(y, dtype=np.float64).reshape(f0.shape) - f0
        result = loo_quadratic_forms(basis, residual, recipe, batch_size, tol=tol, progress=False)
        scores = scores_from_forms(result.forms, basis.n_val, sigma, recipe.lr, batch_size or len(f0))
        return Estimate(scores, result.forms, result.fit, basis, f0, result.train_mse)


def linearize(
    model: nn.Module, x: torch.Tensor, x_val: torch.Tensor, jacobian: JacobianConfig, batch_size: int = 64
) -> Linearization:
    """The `Linearization` of the model at its current weights for `jacobian.projection` (exact: kernels
    from layer factors, no Jacobian formed; otherwise projected Φ in float64)."""
    if jacobian.projection != "exact":
        f0, phi = projected_jacobians(model, x, jacobian, batch_size)
        _, phi_val = projected_jacobians(model, x_val, jacobian, batch_size)
        return Linearization(f0, phi.shape[2], phi=phi, phi_val=phi_val)
    train, val = _factors(model, x, batch_size), _factors(model, x_val, batch_size)
    dim = sum(math.prod(shape) for shape in jacobian_shapes(model).values())
    return Linearization(train.f0.astype(np.float64), dim, kernel(train, train), kernel(val, train))


def _factors(model: nn.Module, x: torch.Tensor, batch_size: int) -> Factors:
    layout = factor_layout(model, tuple(x.shape[1:]))
    return Factors.concat([batch_factors(model, x[i : i + batch_size], layout) for i in range(0, len(x), batch_size)])


def rows_in_basis(
    model: nn.Module,
    x: torch.Tensor,
    x_new: torch.Tensor,
    jacobian: JacobianConfig,
    basis: Basis,
    phi: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """W (m, k, r): the rows in the training basis of inputs the basis was not built with (e.g. the test
    split), W = Θ(new, train) Z s⁻¹ (`ntk.val_rows_from_cross`), for the model at its current weights
    (w0). exact: Θ(new, train) from layer factors; otherwise Φ_new from the same seeded projector as the
    jacobians stage, against the training Φ (`phi`, e.g. read from its shards; computed when None)."""
    if jacobian.projection == "exact":
        cross = kernel(_factors(model, x_new, batch_size), _factors(model, x, batch_size))
        return val_rows_from_cross(cross, basis.z, basis.s)
    if phi is None:
        _, phi = projected_jacobians(model, x, jacobian, batch_size)
    _, phi_new = projected_jacobians(model, x_new, jacobian, batch_size)
    return val_rows_in_basis(phi, phi_new, basis)


def unique_information(
    model: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    x_val: torch.Tensor,
    recipe: Recipe,
    jacobian: JacobianConfig,
    sigma: float = 1.0,
    batch_size: int | None = None,
    tol: float = 1e-14,
) -> Estimate:
    """Exact leave-one-out F-SI and SI of every sample of (x, y) for the network linearized at its
    current weights, trained by `recipe`; the same math as the loo and score stages."""
    return linearize(model, x, x_val, jacobian).estimate(y, recipe, None, sigma, batch_size, tol)


def estimate_from_jacobians(
    f0: np.ndarray,
    phi: np.ndarray,
    phi_val: np.ndarray,
    y: np.ndarray,
    recipe: Recipe,
    sigma: float = 1.0,
    batch_size: int | None = None,
    tol: float = 1e-14,
) -> Estimate:
    """`unique_information` from precomputed f0 (n, k) and projected Jacobians Φ (n, k, D), Φ_val
    (n_val, k, D) at w0."""
    return Linearization(f0, phi.shape[2], phi=phi, phi_val=phi_val).estimate(y, recipe, None, sigma, batch_size, tol)


@dataclass
class TrainedEstimate:
    """The `trained` estimator's forms and fit (sui_core.linearized.scores.trained_forms) and its cost."""

    forms: dict[str, np.ndarray]
    fit: dict[str, np.ndarray]
    directions: int  # output directions followed through the real run
    captured: float  # share of the linearized Σ‖Δf_val‖² inside their span
    seconds: float  # of the reverse pass through the real run (its forward run included)
    train_mse: float  # ½·mean‖f(x) − y‖² of the real trained network
    check: RetrainingCheck | None  # real retraining without a few samples (`check_by_retraining`)


@dataclass
class RetrainingCheck:
    """The F-SI of a few samples by really retraining the network without each, beside both estimates.

    The trained estimate is first order in a sample's weight along the real run: exact where the run
    responds smoothly and linearly to that weight. A long run of a ReLU network can respond to
    infinitesimal weight changes in ways that average out for a whole removal (its tangent then differs
    from the secant), and a memorized sample's removal can be far from linear; this check measures
    whether that happens on the user's own run, where the estimate is largest."""

    samples: np.ndarray  # (c,) indices into the training set: the largest linearized F-SI
    real: np.ndarray  # (c,) Σ_j ‖f(x_j) − f₋ᵢ(x_j)‖² of the real network retrained without i
    trained: np.ndarray  # (c,) the trained estimate of the same
    linearized: np.ndarray  # (c,) the linearized estimate

    def ratios(self) -> np.ndarray:
        return self.trained / np.maximum(self.real, np.finfo(float).tiny)

    def agrees(self, factor: float = 1.5) -> bool:
        """Every checked estimate within `factor` of the real change (either way)."""
        r = self.ratios()
        return bool(np.all((r <= factor) & (r >= 1 / factor)))

    def record(self, sample_id: np.ndarray) -> dict:
        return {
            "sample_id": [int(s) for s in np.asarray(sample_id)[self.samples]],
            **{key: [float(v) for v in getattr(self, key)] for key in ("real", "trained", "linearized")},
        }


def check_by_retraining(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    recipe: Recipe,
    steps: int,
    linearized_fsi: np.ndarray,
    trained_fsi: np.ndarray,
    count: int,
) -> RetrainingCheck:
    """Retrain the real network (the recipe, from w0, in the model's dtype) without each of the `count`
    samples of largest linearized F-SI, beside one run on all samples: count + 1 training runs."""
    samples = np.sort(np.argsort(-linearized_fsi, kind="stable")[:count])
    weights = torch.ones(count + 1, len(x))
    weights[torch.arange(1, count + 1), torch.as_tensor(samples)] = 0
    params = train_full_batch(model, x, y, weights, recipe.lr, steps, recipe.weight_decay)
    out = predict(model, params, x_val).double()
    real = (out[1:] - out[0]).pow(2).sum((1, 2)).numpy()
    return RetrainingCheck(samples, real, trained_fsi[samples], linearized_fsi[samples])


def trained_estimate(
    model: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    x_val: torch.Tensor,
    recipe: Recipe,
    steps: int,
    basis: Basis,
    val_rows: np.ndarray,
    residual: np.ndarray,
    forms: dict[str, np.ndarray],
    fit: dict[str, np.ndarray],
    directions: int,
    tol: float = 1e-14,
    progress: bool | str = False,
    check: int = 0,
) -> TrainedEstimate:
    """Leave-one-out F-SI of the real training run: the top `directions` output directions of the
    linearized changes (`output_subspace`), followed through `steps` steps of the real recipe in one
    reverse pass (`loo_along_run`), the linearized change outside them (`trained_forms`); with `check`
    > 0 that many samples are also really left out (`check_by_retraining`)."""
    subspace = output_subspace(basis, val_rows, residual, recipe, directions, tol)
    run = loo_along_run(
        model,
        x,
        torch.as_tensor(y),
        x_val,
        torch.as_tensor(subspace.directions),
        recipe.lr,
        steps,
        recipe.weight_decay,
        progress=progress,
    )
    real_error = np.asarray(y, dtype=np.float64) - run.train_outputs.double().numpy()
    trained, real_fit = trained_forms(forms, fit, subspace, run.projections.numpy(), real_error)
    train_mse = float(0.5 * np.mean(np.sum(real_error**2, -1)))
    retrained = None
    if check > 0:
        retrained = check_by_retraining(
            model, x, torch.as_tensor(y), x_val, recipe, steps, forms["fsi_sum"], trained["fsi_sum"], check
        )
    return TrainedEstimate(
        trained, real_fit, len(subspace.directions), subspace.captured, run.seconds, train_mse, retrained
    )
