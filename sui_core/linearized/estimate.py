"""The whole estimate in memory: network at w0 + data → per-sample scores, without files or DVC.

The pipeline's stages do the same steps through Parquet shards and a saved basis; experiments that
score many variants (summarization that re-scores after each removal, robustness across seeds and
architectures, validation against retraining) call `unique_information` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sui_core.config import JacobianConfig
from sui_core.linearized.jacobians import jacobian_shapes, make_projector, projected_batches
from sui_core.linearized.ntk import Basis, build_basis
from sui_core.linearized.scores import loo_quadratic_forms, scores_from_forms
from sui_core.linearized.solver import Recipe


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
    projector = make_projector(cfg, jacobian_shapes(model))
    with torch.no_grad():
        f0s, phis = zip(*projected_batches(model, x, projector, 0, len(x), batch_size, dtype))
    return np.concatenate(f0s), np.concatenate(phis)


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
    f0, phi = projected_jacobians(model, x, jacobian)
    _, phi_val = projected_jacobians(model, x_val, jacobian)
    return estimate_from_jacobians(f0, phi, phi_val, y, recipe, sigma, batch_size, tol)


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
    (n_val, k, D) at w0: re-scoring a subset of the samples (rows of f0, Φ, y) needs no new Jacobians."""
    n, k, dim = phi.shape
    basis = build_basis(lambda: [phi], lambda: [phi_val], n, k, dim)
    residual = np.asarray(y, dtype=np.float64).reshape(n, k) - f0
    result = loo_quadratic_forms(basis, residual, recipe, batch_size, tol=tol, progress=False)
    scores = scores_from_forms(result.forms, basis.n_val, sigma, recipe.lr, batch_size or n)
    return Estimate(scores, result.forms, result.fit, basis, f0, result.train_mse)
