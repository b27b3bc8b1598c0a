"""The smoothed scores against a weight-space computation from scratch: SI (isotropic, hessian, sgd)
and F-SI from brute-force leave-one-out weights, with the SGD covariance from scipy's Lyapunov solver."""

import numpy as np
import pytest
from scipy.linalg import solve_continuous_lyapunov

from sui_core.linearized.ntk import build_basis
from sui_core.linearized.reference import brute_force_deltas, trained_weights
from sui_core.linearized.scores import loo_quadratic_forms, scores_from_forms
from sui_core.linearized.solver import Recipe


@pytest.mark.parametrize("k,weight_decay,batch_size", [(1, 0.0, None), (2, 0.03, 16)])
def test_scores_match_weight_space_definitions(k, weight_decay, batch_size):
    rng = np.random.default_rng(k)
    n, dim, n_val, lr, t, sigma = 80, 10, 9, 0.05, 300, 0.7
    phi = rng.normal(size=(n, k, dim)) / np.sqrt(1 + np.arange(dim))
    residual = rng.normal(size=(n, k))
    phi_val = rng.normal(size=(n_val, k, dim))
    recipe = Recipe(lr, weight_decay, t, "discrete")
    basis = build_basis(lambda: [phi], lambda: [phi_val], n, k, dim)
    result = loo_quadratic_forms(basis, residual, recipe, batch_size, progress=False)
    b = batch_size or n
    got = scores_from_forms(result.forms, n_val, sigma, lr, b)

    deltas = brute_force_deltas(phi, residual, recipe.full(n), recipe.left_out(n), range(n))
    rows = phi.reshape(-1, dim)
    h_mean = rows.T @ rows / n + weight_decay * np.eye(dim)
    v = trained_weights(phi, residual, recipe.full(n))
    grads = np.einsum("nkd,nk->nd", phi, np.einsum("nkd,d->nk", phi, v) - residual) + weight_decay * v
    centered = grads - grads.mean(0)
    sgd_cov = solve_continuous_lyapunov(h_mean, (lr / b) * centered.T @ centered / n)
    precision = np.linalg.inv(sgd_cov)
    val_rows = phi_val.reshape(-1, dim)
    want = {
        "fsi": np.array([np.sum((val_rows @ d) ** 2) for d in deltas]) / (2 * sigma**2 * n_val),
        "si_isotropic": np.einsum("nd,nd->n", deltas, deltas) / (2 * sigma**2),
        "si_hessian": np.einsum("nd,de,ne->n", deltas, h_mean, deltas) * b / (lr * sigma**2),
        "si_sgd": 0.5 * np.einsum("nd,de,ne->n", deltas, precision, deltas),
    }
    for name, values in want.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-7, err_msg=name)
