"""Slow, independent references for the leave-one-out solver: used by the tests and the benchmark.

Nothing here shares code with `sui_core.solver` beyond `GradientDescent.factor` (the scalar g):
each left-out problem is built and solved from scratch.
"""

from __future__ import annotations

import numpy as np

from sui_core.solver import GradientDescent


def trained_weights(phi: np.ndarray, residual: np.ndarray, gd: GradientDescent) -> np.ndarray:
    """v(t) = g(ΦᵀΦ + λI) Φᵀ r by an eigendecomposition in the smaller space.

    The kernel form uses g(ΦᵀΦ + λ)Φᵀ = Φᵀ g(ΦΦᵀ + λ), valid for the entire function g.
    phi is (n, k, D) or (nk, D); residual (n, k) or (nk,)."""
    rows = phi.reshape(-1, phi.shape[-1]).astype(np.float64)
    r = residual.reshape(-1).astype(np.float64)
    if rows.shape[1] <= rows.shape[0]:
        s, q = np.linalg.eigh(rows.T @ rows)
        return q @ (gd.factor(np.maximum(s, 0)) * (q.T @ (rows.T @ r)))
    s, u = np.linalg.eigh(rows @ rows.T)
    return rows.T @ (u @ (gd.factor(np.maximum(s, 0)) * (u.T @ r)))


def brute_force_deltas(phi: np.ndarray, residual: np.ndarray, full: GradientDescent,
                       left: GradientDescent, indices) -> np.ndarray:
    """Δv_i = v − v_{−i} for each i in `indices`, retraining the linear model from scratch: (m, D)."""
    v = trained_weights(phi, residual, full)
    out = []
    for i in indices:
        keep = np.arange(phi.shape[0]) != i
        out.append(v - trained_weights(phi[keep], residual[keep], left))
    return np.array(out)


def gradient_descent_steps(phi: np.ndarray, residual: np.ndarray, gd: GradientDescent) -> np.ndarray:
    """t explicit steps v ← v − η(ΦᵀΦv + λv − Φᵀr) from v = 0, in weight space."""
    rows = phi.reshape(-1, phi.shape[-1]).astype(np.float64)
    r = residual.reshape(-1).astype(np.float64)
    v = np.zeros(rows.shape[1])
    for _ in range(int(gd.t)):
        v -= gd.eta * (rows.T @ (rows @ v - r) + gd.lam * v)
    return v
