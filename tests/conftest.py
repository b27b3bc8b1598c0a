"""Fixtures shared by the tests: small random linearized problems."""

import numpy as np
import pytest


def random_problem(n: int, k: int, dim: int, seed: int, n_val: int = 6, duplicate: str | None = None):
    """Per-sample Jacobians Φ (n, k, D) and validation Jacobians (n_val, k, D) with decaying column scales
    (a spread-out spectrum, as real Jacobians have), and a residual (n, k).

    `duplicate`: "columns" makes ΦᵀΦ rank-deficient (the last three columns copy the first three),
    "samples" makes ΦΦᵀ rank-deficient (sample 1 copies sample 0)."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(1 + np.arange(dim))
    phi = rng.normal(size=(n, k, dim)) * scale
    if duplicate == "columns":
        phi[..., -3:] = phi[..., :3]
    if duplicate == "samples":
        phi[1] = phi[0]
    residual = rng.normal(size=(n, k))
    phi_val = rng.normal(size=(n_val, k, dim)) * scale
    return phi, residual, phi_val


@pytest.fixture
def make_problem():
    """`random_problem`, for tests that build several problems."""
    return random_problem
