"""The paper's kernel-space leave-one-out algorithm (Appendix E) against from-scratch retraining."""

import numpy as np
import pytest

from sui_core.linearized.reference import brute_force_deltas, paper_kernel_deltas
from sui_core.linearized.solver import Recipe

REL = 1e-8


CASES = [
    # n, k, dim, lr, weight_decay, t, dynamics
    (20, 1, 60, 0.1, 0.0, 200, "discrete"),
    (20, 1, 60, 0.1, 0.01, 50, "continuous"),
    (12, 3, 70, 0.2, 0.0, 30, "continuous"),
    (15, 2, 50, 0.1, 0.05, 500, "discrete"),  # λ and η differ between the full and left-out problems
    (15, 2, 20, 0.1, 0.05, float("inf"), "discrete"),  # converged; nk > D, invertible through λ
]


@pytest.mark.parametrize("n,k,dim,lr,wd,t,dynamics", CASES)
def test_paper_algorithm_matches_brute_force(make_problem, n, k, dim, lr, wd, t, dynamics):
    phi, residual, phi_val = make_problem(n, k, dim, seed=n + k)
    recipe = Recipe(lr, wd, t, dynamics)
    full, left = recipe.full(n), recipe.left_out(n)
    indices = [0, n // 2, n - 1]
    want = brute_force_deltas(phi, residual, full, left, indices)
    dw, dval = paper_kernel_deltas(phi, residual, full, left, indices, phi_val)
    assert dw.shape == want.shape and dval.shape == (len(indices), len(phi_val) * k)
    for row in range(len(indices)):
        err = np.linalg.norm(dw[row] - want[row]) / np.linalg.norm(want[row])
        assert err <= REL, f"sample {indices[row]}: Δw off by {err:.2e}"
        want_val = phi_val.reshape(-1, dim) @ want[row]
        err = np.linalg.norm(dval[row] - want_val) / np.linalg.norm(want_val)
        assert err <= REL, f"sample {indices[row]}: Δf_val off by {err:.2e}"


def test_paper_algorithm_without_validation_set(make_problem):
    phi, residual, _ = make_problem(10, 1, 30, seed=3)
    recipe = Recipe(0.1, 0.0, 100, "discrete")
    dw, dval = paper_kernel_deltas(phi, residual, recipe.full(10), recipe.left_out(10), [4])
    assert dval is None and dw.shape == (1, 30)
    assert np.allclose(
        dw, brute_force_deltas(phi, residual, recipe.full(10), recipe.left_out(10), [4]), rtol=REL, atol=0
    )
