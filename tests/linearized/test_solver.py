"""The exact leave-one-out solver against from-scratch retraining of the linear model (float64)."""

import math

import numpy as np
import pytest

from sui_core.linearized.ntk import build_basis
from sui_core.linearized.reference import brute_force_deltas, gradient_descent_steps, trained_weights
from sui_core.linearized.solver import (
    GradientDescent,
    Recipe,
    chebyshev_left_out,
    chebyshev_left_out_direct,
    chebyshev_vandermonde,
    group_delta,
    loo_deltas,
)

REL = 1e-8


def solve(phi, residual, phi_val, full, left, block_size=16):
    n, k, dim = phi.shape
    basis = build_basis(lambda: np.array_split(phi, 3), lambda: [phi_val], n, k, dim)
    plan, blocks = loo_deltas(basis.s, basis.z, residual, full, left, block_size=block_size)
    deltas = np.concatenate([d for _, d in blocks])
    return basis, plan, deltas


def assert_matches(basis, deltas, phi, phi_val, reference, indices):
    for row, i in enumerate(indices):
        dv = reference[row]
        want_train = phi.reshape(-1, phi.shape[-1]) @ dv
        got_train = basis.z.reshape(-1, basis.rank) @ deltas[i]
        err = np.linalg.norm(got_train - want_train) / np.linalg.norm(want_train)
        assert err <= REL, f"sample {i}: training-output change off by {err:.2e}"
        assert deltas[i] @ deltas[i] == pytest.approx(dv @ dv, rel=REL)
        want_val = np.sum((phi_val.reshape(-1, phi.shape[-1]) @ dv) ** 2)
        assert deltas[i] @ basis.gram_val @ deltas[i] == pytest.approx(want_val, rel=REL)


CASES = [
    # n, k, dim, lam, t, dynamics
    (40, 1, 12, 0.0, 5, "discrete"),  # primal, short training
    (40, 1, 12, 0.5, 3000, "discrete"),  # primal, long training: Chebyshev
    (30, 3, 150, 0.0, 20, "continuous"),  # kernel space, k = 3
    (30, 3, 150, 2.0, 4000, "continuous"),
    (60, 1, 200, 0.0, 2000, "discrete"),
    (25, 3, 40, 0.1, 700, "discrete"),
]


@pytest.mark.parametrize("n,k,dim,lam,t,dynamics", CASES)
def test_every_delta_matches_brute_force(make_problem, n, k, dim, lam, t, dynamics):
    phi, residual, phi_val = make_problem(n, k, dim, seed=n + dim)
    h_max = np.linalg.eigvalsh(phi.reshape(-1, dim).T @ phi.reshape(-1, dim)).max() + lam
    eta = 1.0 / h_max  # stable for discrete steps
    full = GradientDescent(eta, lam, t, dynamics)
    left = GradientDescent(eta * 1.1, lam * 0.9, t, dynamics)  # the left-out recipe may differ
    basis, plan, deltas = solve(phi, residual, phi_val, full, left)
    assert basis.space == ("primal" if dim <= n * k else "kernel")
    reference = brute_force_deltas(phi, residual, full, left, range(n))
    assert_matches(basis, deltas, phi, phi_val, reference, range(n))


def test_a_few_hundred_samples_both_methods(make_problem):
    n, k, dim = 300, 1, 64
    phi, residual, phi_val = make_problem(n, k, dim, seed=3)
    h_max = np.linalg.eigvalsh(phi[:, 0].T @ phi[:, 0]).max()
    indices = [0, 17, 150, 299]
    for t, step in ((60, 1.9), (5000, 1.0)):
        recipe = GradientDescent(step / h_max, 0.0, t, "discrete")
        basis, plan, deltas = solve(phi, residual, phi_val, recipe, recipe, block_size=64)
        assert plan.matvecs < t  # a polynomial of degree t − 1 is represented exactly
        reference = brute_force_deltas(phi, residual, recipe, recipe, indices)
        assert_matches(basis, deltas, phi, phi_val, reference, indices)


@pytest.mark.parametrize("dim", [10, 90])
def test_discrete_closed_form_equals_explicit_gradient_steps(make_problem, dim):
    n, k, t = 30, 2, 400
    phi, residual, phi_val = make_problem(n, k, dim, seed=dim)
    h_max = np.linalg.eigvalsh(phi.reshape(-1, dim).T @ phi.reshape(-1, dim)).max()
    full = GradientDescent(1.0 / h_max, 0.3, t, "discrete")
    left = GradientDescent(1.05 / h_max, 0.25, t, "discrete")
    basis, plan, deltas = solve(phi, residual, phi_val, full, left)
    indices = [0, 11, 29]
    v = gradient_descent_steps(phi, residual, full)
    reference = []
    for i in indices:
        keep = np.arange(n) != i
        reference.append(v - gradient_descent_steps(phi[keep], residual[keep], left))
    assert_matches(basis, deltas, phi, phi_val, np.array(reference), indices)
    # and the closed form of the reference itself equals the steps
    np.testing.assert_allclose(trained_weights(phi, residual, full), v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dim", [15, 120])
def test_converged_ridge_matches_closed_form(make_problem, dim):
    n, k, lam = 35, 2, 0.7
    phi, residual, phi_val = make_problem(n, k, dim, seed=7)
    gd = GradientDescent(0.01, lam, math.inf, "continuous")
    basis, plan, deltas = solve(phi, residual, phi_val, gd, gd)
    assert plan.method == "woodbury"
    rows = phi.reshape(-1, dim)
    h_inv = np.linalg.inv(rows.T @ rows + lam * np.eye(dim))
    v = h_inv @ rows.T @ residual.reshape(-1)
    reference = []
    for i in range(n):
        phi_i = phi[i]
        inner = np.linalg.solve(np.eye(k) - phi_i @ h_inv @ phi_i.T, residual[i] - phi_i @ v)
        reference.append(h_inv @ phi_i.T @ inner)
    assert_matches(basis, deltas, phi, phi_val, np.array(reference), range(n))


@pytest.mark.parametrize("duplicate,dim,dynamics", [("columns", 20, "discrete"), ("samples", 80, "continuous")])
def test_lambda_zero_with_singular_hessian_is_finite_and_correct(make_problem, duplicate, dim, dynamics):
    n, k = 30, 1
    phi, residual, phi_val = make_problem(n, k, dim, seed=11, duplicate=duplicate)
    rows = phi.reshape(-1, dim)
    assert np.linalg.matrix_rank(rows.T @ rows) < min(n * k, dim)
    h_max = np.linalg.eigvalsh(rows.T @ rows).max()
    gd = GradientDescent(1.0 / h_max, 0.0, 1500, dynamics)
    basis, plan, deltas = solve(phi, residual, phi_val, gd, gd)
    assert np.all(np.isfinite(deltas))
    reference = brute_force_deltas(phi, residual, gd, gd, range(n))
    assert_matches(basis, deltas, phi, phi_val, reference, range(n))


def test_gradient_descent_factor_is_entire_and_accurate():
    gd = GradientDescent(0.01, 0.0, 100, "discrete")
    h = np.array([0.0, 1e-300, 1e-12, 1e-3, 1.0, 150.0, 199.9])
    g = gd.factor(h)
    assert np.all(np.isfinite(g))
    assert g[0] == pytest.approx(gd.eta * gd.t)
    assert g[1] == pytest.approx(gd.eta * gd.t)
    # against exact rational arithmetic of the geometric series Σ_{s<t} η(1 − ηh)^s
    from fractions import Fraction

    for hv, gv in zip(h[2:], g[2:]):
        x = Fraction(gd.eta) * Fraction(hv)
        exact = sum(Fraction(gd.eta) * (1 - x) ** s for s in range(100))
        assert gv == pytest.approx(float(exact), rel=1e-12)
    cont = GradientDescent(0.01, 0.0, 100, "continuous").factor(np.array([0.0, 1e-14, 2.0]))
    assert cont[0] == pytest.approx(1.0) and cont[1] == pytest.approx(1.0)
    assert cont[2] == pytest.approx((1 - math.exp(-2.0)) / 2.0, rel=1e-14)


def test_unstable_learning_rate_is_refused(make_problem):
    phi, residual, _ = make_problem(20, 1, 10, seed=1)
    h_max = np.linalg.eigvalsh(phi[:, 0].T @ phi[:, 0]).max()
    gd = GradientDescent(2.5 / h_max, 0.0, 100, "discrete")
    basis = build_basis(lambda: [phi], lambda: [phi[:2]], 20, 1, 10)
    with pytest.raises(Exception, match="training.lr"):
        loo_deltas(basis.s, basis.z, residual, gd, gd)


def test_recipe_maps_mean_loss_to_sum_loss():
    recipe = Recipe(lr=0.3, weight_decay=0.02, t=10, dynamics="discrete")
    assert recipe.full(50) == GradientDescent(0.3 / 50, 50 * 0.02, 10, "discrete")
    assert recipe.left_out(50) == GradientDescent(0.3 / 49, 49 * 0.02, 10, "discrete")


@pytest.mark.parametrize(
    "n,k,dim,weight_decay,t", [(40, 1, 12, 0.0, 800), (30, 2, 90, 0.02, 300), (25, 1, 60, 0.05, math.inf)]
)
def test_group_left_out_matches_retraining_without_the_group(make_problem, n, k, dim, weight_decay, t):
    phi, residual, phi_val = make_problem(n, k, dim, seed=dim)
    basis = build_basis(lambda: [phi], lambda: [phi_val], n, k, dim)
    rows = phi.reshape(-1, dim)
    recipe = Recipe(0.5 * n / np.linalg.eigvalsh(rows.T @ rows).max(), weight_decay, t, "discrete")
    v = trained_weights(phi, residual, recipe.full(n))
    for members in (np.array([3]), np.array([0, 7, 8, 20]), np.arange(n // 2)):
        keep = np.setdiff1d(np.arange(n), members)
        dv = v - trained_weights(phi[keep], residual[keep], recipe.on(len(keep)))
        delta = group_delta(basis.s, basis.z, residual, recipe, members)
        got_train = basis.z.reshape(-1, basis.rank) @ delta
        assert np.linalg.norm(got_train - rows @ dv) <= REL * np.linalg.norm(rows @ dv)
        assert delta @ delta == pytest.approx(dv @ dv, rel=REL)
        assert delta @ basis.gram_val @ delta == pytest.approx(np.sum((phi_val.reshape(-1, dim) @ dv) ** 2), rel=REL)
    # a group of one is the single-sample leave-one-out
    _, blocks = loo_deltas(basis.s, basis.z, residual, recipe.full(n), recipe.left_out(n))
    single = np.concatenate([d for _, d in blocks])[3]
    np.testing.assert_allclose(
        group_delta(basis.s, basis.z, residual, recipe, np.array([3])),
        single,
        rtol=1e-7,
        atol=1e-9 * np.abs(single).max(),
    )


@pytest.mark.parametrize("k", [1, 3, 4, 7])
@pytest.mark.parametrize("degree", [0, 1, 2, 40])
def test_both_chebyshev_recurrences_equal_the_dense_polynomial(k, degree):
    """Σ_j c_j T_j(Â_i) b_i from the moment recurrence and from the direct one, against the polynomial
    evaluated on the eigenvalues of the dense r×r matrix Â_i = D̂ − α Z_iᵀZ_i."""
    rng = np.random.default_rng(10 * k + degree)
    n_b, r, alpha = 5, 30, 0.7
    d_hat = np.sort(rng.uniform(-1, 1, r))
    z = rng.normal(size=(n_b, k, r)) / (2 * np.sqrt(r * k))  # keeps the spectrum of Â_i inside [−1.5, 1.5]
    b = rng.normal(size=(n_b, r))
    coeffs = rng.normal(size=degree + 1) / np.arange(1, degree + 2)
    moments = chebyshev_left_out(chebyshev_vandermonde(d_hat, degree), alpha, z, b, coeffs)
    direct = chebyshev_left_out_direct(d_hat, alpha, z, b, coeffs)
    for i in range(n_b):
        evals, evecs = np.linalg.eigh(np.diag(d_hat) - alpha * z[i].T @ z[i])
        want = evecs @ (np.polynomial.chebyshev.chebval(evals, coeffs) * (evecs.T @ b[i]))
        scale = np.abs(want).max()
        assert np.abs(moments[i] - want).max() <= 1e-11 * scale
        assert np.abs(direct[i] - want).max() <= 1e-11 * scale
