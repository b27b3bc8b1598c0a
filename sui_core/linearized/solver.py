"""Exact leave-one-out deltas of gradient descent on a linearized network.

The linearized model f(x) = f0(x) + Φ(x) v, v = w − w0, is trained by gradient descent on the sum loss
½‖Φ v − r‖² + (λ/2)‖v‖² (r = Y − f0(X)) with learning rate η for t steps. In closed form
v(t) = g(H) Φᵀ r with H = ΦᵀΦ + λI and the gradient-descent factor g (see `GradientDescent.factor`).

Everything here works in an orthonormal eigenbasis of ΦᵀΦ (built by `sui_core.linearized.ntk`): eigenvalues
s (r,), training rows Z (n, k, r). Leaving sample i out turns H into diag(s + λ') − Z_iᵀZ_i — a
diagonal minus a rank-k matrix — and the right-hand side into Zᵀr − Z_iᵀr_i. We apply g' to that
operator exactly, batched over samples:

- t = ∞ (λ' > 0): g(h) = 1/h, solved by the Woodbury identity.
- otherwise a Chebyshev expansion of g' on an interval that holds every left-out spectrum
  ([λ', max s + λ'], by interlacing), its degree m chosen from the coefficients so that the dropped
  terms are below `tol` relative to max|g'|. For discrete dynamics g' is a polynomial of degree t − 1,
  so the expansion never needs more than t terms and is then exact. For few outputs (k < DIRECT_MIN_K)
  the recurrence runs on m×k coefficients per sample rather than on r-vectors (`chebyshev_left_out`),
  so the r-sized work is three BLAS3 products per block of samples, O(r·m·k²) per sample; from
  DIRECT_MIN_K outputs on, the k² costs more than running the recurrence on the r-vectors themselves,
  O(r·m·k) (`chebyshev_left_out_direct`; measured crossover in docs/decisions.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.fft

from sui_core.config import TrainingConfig
from sui_core.errors import ParamError
from sui_core.linearized.rows import residual_contraction


@dataclass(frozen=True)
class GradientDescent:
    """Gradient descent on the sum loss: learning rate `eta`, L2 strength `lam` towards w0, `t` steps."""

    eta: float
    lam: float
    t: float
    dynamics: str  # "discrete": t steps of size eta; "continuous": gradient flow for time eta·t

    def factor(self, s: np.ndarray) -> np.ndarray:
        """g(s + λ) where v(t) = g(H) Φᵀr; g is entire, g(0) = η t, so λ = 0 stays finite."""
        h = np.maximum(np.asarray(s, dtype=np.float64) + self.lam, 0.0)
        if math.isinf(self.t):
            with np.errstate(divide="ignore"):
                return 1.0 / h
        eta_t = self.eta * self.t
        safe_h = np.where(h > 0, h, 1.0)
        x = self.eta * h
        if self.dynamics == "continuous":
            g = -np.expm1(-eta_t * h) / safe_h
        else:
            # 1 − (1 − x)^t without cancellation for small x; x ≥ 1 has no cancellation to avoid.
            small = x < 1
            with np.errstate(invalid="ignore", divide="ignore"):
                g_small = -np.expm1(self.t * np.log1p(-np.where(small, x, 0.0))) / safe_h
            g_large = (1.0 - np.power(1.0 - x, self.t)) / safe_h
            g = np.where(small, g_small, g_large)
        return np.where(h > 0, g, eta_t)

    def check_stable(self, h_max: float) -> None:
        """Discrete gradient descent diverges unless η·h_max < 2: refuse such an lr."""
        if self.dynamics == "discrete" and math.isfinite(self.t) and self.eta * h_max >= 2:
            raise ParamError(
                "training.lr",
                f"gradient descent diverges: lr times the largest eigenvalue of the mean-loss Hessian is "
                f"{self.eta * h_max:.4g} >= 2; lower lr below {2 / h_max / self.eta:.4g} x its value",
            )


@dataclass(frozen=True)
class Recipe:
    """A training recipe in PyTorch terms: SGD with `lr` and `weight_decay` on the mean loss
    ½·mean_i‖f(x_i) − y_i‖², full batch, for `t` steps.

    On n samples that is sum-loss gradient descent with η = lr/n and λ = n·weight_decay. The left-out
    model is what the same recipe gives on the other n − 1 samples: η = lr/(n − 1),
    λ = (n − 1)·weight_decay. Weight decay pulls towards w0, the linearization point.
    """

    lr: float
    weight_decay: float
    t: float
    dynamics: str

    @classmethod
    def from_config(cls, cfg: TrainingConfig) -> Recipe:
        return cls(cfg.lr, cfg.weight_decay, cfg.t, cfg.dynamics)

    def on(self, n: int) -> GradientDescent:
        return GradientDescent(self.lr / n, n * self.weight_decay, self.t, self.dynamics)

    def full(self, n: int) -> GradientDescent:
        return self.on(n)

    def left_out(self, n: int) -> GradientDescent:
        return self.on(n - 1)


@dataclass(frozen=True)
class SolverPlan:
    """How the left-out problems are solved, for the record beside the outputs."""

    method: str  # "woodbury" or "chebyshev"
    matvecs: int  # operator products per sample
    interval: tuple[float, float]  # holds every left-out Hessian spectrum
    error_bound: float  # bound on |g' − p| over the interval, relative to max|g'|

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "matvecs": self.matvecs,
            "interval": list(self.interval),
            "error_bound": self.error_bound,
        }


def chebyshev_coefficients(f, lo: float, hi: float, tol: float, max_degree: int = 1 << 16) -> np.ndarray | None:
    """Coefficients of a Chebyshev interpolant of f on [lo, hi], without the trailing ones below
    tol·max|c|. Doubles the number of nodes until the last quarter of the coefficients is below that
    level (tol must sit above the rounding floor, ~1e-16·max|c|); None if that needs over `max_degree`."""
    n_nodes = 32
    while True:
        theta = np.pi * (np.arange(n_nodes) + 0.5) / n_nodes
        x = lo + (np.cos(theta) + 1.0) * (hi - lo) / 2
        c = scipy.fft.dct(f(x), type=2) / n_nodes
        c[0] /= 2
        big = np.abs(c) > tol * np.abs(c).max()
        if not big[-n_nodes // 4 :].any():
            return c[: int(np.flatnonzero(big).max()) + 1]
        if n_nodes >= max_degree:
            return None
        n_nodes *= 2


def woodbury_solve(d: np.ndarray, z: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(diag(d) − Z_iᵀZ_i)⁻¹ b_i for a block: D⁻¹b + D⁻¹Zᵀ (I − Z D⁻¹ Zᵀ)⁻¹ Z D⁻¹b. z (B, k, r)."""
    dinv_b = b / d
    zd = z / d
    small = np.eye(z.shape[1]) - np.einsum("bkr,bjr->bkj", zd, z)
    y = np.linalg.solve(small, np.einsum("bkr,br->bk", z, dinv_b)[..., None])[..., 0]
    return dinv_b + np.einsum("bkr,bk->br", zd, y)


def chebyshev_vandermonde(x: np.ndarray, degree: int) -> np.ndarray:
    """V[a, p] = T_p(x_a) for p = 0..degree; |V| ≤ 1 for x in [−1, 1]."""
    v = np.empty((len(x), degree + 1))
    v[:, 0] = 1.0
    if degree:
        v[:, 1] = x
    for p in range(2, degree + 1):
        v[:, p] = 2.0 * x * v[:, p - 1] - v[:, p - 2]
    return v


def chebyshev_left_out(v: np.ndarray, alpha: float, z: np.ndarray, b: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Σ_j c_j T_j(Â_i) b_i for a block of samples, Â_i = D̂ − α Z_iᵀZ_i, with V = T_p(D̂) (r, m+1).

    T_j(Â_i)b_i = T_j(D̂)b_i + Σ_p T_p(D̂) Z_iᵀ w_{j,p} exactly: the rank-k part only ever adds
    polynomials of D̂ applied to Z_iᵀ. So the recurrence runs on the coefficients w (m × k per
    sample, not r), driven by the moments μ_p = Z_i T_p(D̂) b_i and ν_p = Z_i T_p(D̂) Z_iᵀ, and every
    r-sized operation is one matrix product with V (BLAS3). Cost per sample O(r·m·k² + m²·k²)
    instead of O(r·m·k).
    """
    n_b, k, r = z.shape
    m = len(coeffs) - 1
    if m == 0:
        return coeffs[0] * b
    mu = ((z * b[:, None, :]).reshape(n_b * k, r) @ v).reshape(n_b, k, m + 1).transpose(0, 2, 1)
    nu = ((z[:, :, None, :] * z[:, None, :, :]).reshape(n_b * k * k, r) @ v).reshape(n_b, k, k, m + 1)
    nu = nu.transpose(0, 3, 1, 2)  # (B, p, k, l)
    w_prev = np.zeros((n_b, m + 1, k))
    w = np.zeros((n_b, m + 1, k))
    w[:, 0] = -alpha * mu[:, 0]  # T_1(Â)b = D̂b − αZᵀ(Zb)
    acc = coeffs[1] * w
    for j in range(1, m):
        top = j + 1  # w_j lives on p < j, w_{j+1} on p ≤ j
        sigma = mu[:, j] + np.einsum("bpkl,bpl->bk", nu[:, :top], w[:, :top])  # Z_i T_j(Â_i) b_i
        w_next = -w_prev
        w_next[:, 1 : top + 1] += w[:, :top]  # 2·D̂ acting on Chebyshev coefficients:
        w_next[:, : top - 1] += w[:, 1:top]  # 2x T_p = T_{p+1} + T_{|p−1|}
        w_next[:, 1] += w[:, 0]
        w_next[:, 0] -= 2.0 * alpha * sigma
        acc += coeffs[j + 1] * w_next
        w_prev, w = w, w_next
    rank_k = (acc.transpose(0, 2, 1).reshape(n_b * k, m + 1) @ v.T).reshape(n_b, k, r)
    return (v @ coeffs) * b + np.einsum("bkr,bkr->br", z, rank_k)


def chebyshev_left_out_direct(
    d_hat: np.ndarray, alpha: float, z: np.ndarray, b: np.ndarray, coeffs: np.ndarray
) -> np.ndarray:
    """Σ_j c_j T_j(Â_i) b_i for a block of samples by the three-term recurrence on r-vectors,
    T_{j+1}(Â)b = 2ÂT_j(Â)b − T_{j−1}(Â)b with Â_i y = D̂y − αZ_iᵀ(Z_i y), d_hat the diagonal of D̂.

    Two batched matrix–vector products with Z_i per term: O(r·m·k) per sample, but memory-bound (Z_i is
    read twice per term), so the caller keeps blocks small enough for Z to stay in cache
    (`DIRECT_BLOCK_VALUES`). The same polynomial as `chebyshev_left_out`, in another rounding order.
    """
    acc = coeffs[0] * b
    if len(coeffs) == 1:
        return acc
    two_d, two_alpha = 2.0 * d_hat, 2.0 * alpha

    def twice_a_hat(y: np.ndarray) -> np.ndarray:
        zy = np.matmul(z, y[:, :, None])  # (B, k, 1)
        zy *= two_alpha
        out = two_d * y
        out -= np.matmul(zy.transpose(0, 2, 1), z)[:, 0]
        return out

    y_prev, y = b, 0.5 * twice_a_hat(b)
    acc += coeffs[1] * y
    for c in coeffs[2:]:
        y_next = twice_a_hat(y)
        y_next -= y_prev
        acc += c * y_next
        y_prev, y = y, y_next
    return acc


DIRECT_MIN_K = 4  # outputs from which `chebyshev_left_out_direct` beats the moment recurrence
DIRECT_BLOCK_VALUES = 1 << 17  # Z values per block of the direct recurrence: 1 MiB of float64, cache-sized


def moments_block_size(k: int, r: int, block_size: int) -> int:
    """Samples per block of `chebyshev_left_out`: its moments ν hold B·k²·r values (at most 2²³)."""
    return max(1, min(block_size, (1 << 23) // (k * k * max(r, 1))))


def direct_block_size(k: int, r: int, block_size: int) -> int:
    """Samples per block of `chebyshev_left_out_direct`: Z's B·k·r values, read twice per term, kept
    cache-sized (`DIRECT_BLOCK_VALUES`; at least 4 samples, below which per-call overhead dominates)."""
    return max(1, min(block_size, max(4, DIRECT_BLOCK_VALUES // (k * max(r, 1)))))


def left_out_block_size(k: int, r: int, block_size: int) -> int:
    """Samples per block of the Chebyshev solve for k outputs (the recurrence `loo_deltas` picks)."""
    return (direct_block_size if k >= DIRECT_MIN_K else moments_block_size)(k, r, block_size)


def plan_left_out(s: np.ndarray, gd: GradientDescent, tol: float) -> tuple[SolverPlan, np.ndarray | None]:
    """Pick the exact method for applying g' to every left-out Hessian, and its Chebyshev series."""
    lo = gd.lam
    hi = float(s.max(initial=0.0)) + gd.lam
    if math.isinf(gd.t):
        return SolverPlan("woodbury", 1, (lo, hi), 0.0), None
    if hi - lo <= 1e-14 * max(hi, 1.0):
        return SolverPlan("chebyshev", 0, (lo, hi), 0.0), np.array([float(gd.factor(np.array([0.0]))[0])])
    coeffs = chebyshev_coefficients(lambda h: gd.factor(h - gd.lam), lo, hi, tol)
    if coeffs is None:
        raise ParamError(
            "training.t",
            f"gradient flow for eta*t*h_max = {gd.eta * gd.t * hi:.3g} needs over "
            f"65536 Chebyshev terms at loo.tol={tol:g}; use t: inf with weight_decay > 0, "
            "a shorter t, or a larger loo.tol",
        )
    return SolverPlan("chebyshev", len(coeffs) - 1, (lo, hi), tol), coeffs


def trained_coefficients(s: np.ndarray, z: np.ndarray, residual: np.ndarray, gd: GradientDescent) -> np.ndarray:
    """Coefficients in the eigenbasis of v(t) = g(H) Φᵀ r for the model trained on all samples."""
    return gd.factor(s) * residual_contraction(z, residual)


def group_delta(
    s: np.ndarray,
    z: np.ndarray,
    residual: np.ndarray,
    recipe: Recipe,
    members: np.ndarray,
    rhs: np.ndarray | None = None,
) -> np.ndarray:
    """Δc when all `members` are left out together (group unique information): the same recipe on the
    n − |G| others. H_{−G} = diag(s + λ') − Z_GᵀZ_G is a rank-|G|k downdate, solved here by one
    eigendecomposition of the r×r matrix: exact, O(r³) per group, for any group size. `rhs`: Σ Z_iᵀr_i
    (`residual_contraction`) when the caller has it, which spares two passes over all of Z per group."""
    n = z.shape[0]
    if not 0 < len(members) < n:
        raise ValueError(f"a group must leave 1 to {n - 1} samples out, got {len(members)}")
    full, left = recipe.full(n), recipe.on(n - len(members))
    rhs = residual_contraction(z, residual) if rhs is None else rhs
    z_group = z[members].reshape(-1, z.shape[2])
    b = rhs - z_group.T @ residual[members].reshape(-1)
    evals, evecs = np.linalg.eigh(np.diag(s + left.lam) - z_group.T @ z_group)
    left.check_stable(float(evals.max(initial=0.0)))
    c_left = evecs @ (left.factor(evals - left.lam) * (evecs.T @ b))
    return full.factor(s) * rhs - c_left  # trained_coefficients


def loo_deltas(
    s: np.ndarray,
    z: np.ndarray,
    residual: np.ndarray,
    full: GradientDescent,
    left: GradientDescent,
    tol: float = 1e-14,
    block_size: int = 256,
    dtype: str = "float64",
    samples: range | None = None,
) -> tuple[SolverPlan, Iterator[tuple[int, np.ndarray]]]:
    """Δc_i = c − c_{−i}, the change of the trained weights in the eigenbasis when sample i is left out.

    Returns the plan and an iterator of (first sample index, Δc block (B, r)) over `samples` (a
    contiguous range, default all: a worker of a distributed run solves its own range). `full` and
    `left` are the recipes on n and n − 1 samples (see `Recipe`); they may differ in η and λ.
    """
    n = z.shape[0]
    h_max = float(s.max(initial=0.0))
    full.check_stable(h_max + full.lam)
    left.check_stable(h_max + left.lam)
    floor = 1e-14 if dtype == "float64" else 1e-6
    plan, coeffs = plan_left_out(s, left, max(tol, floor))
    rhs = residual_contraction(z, residual)
    c_full = full.factor(s) * rhs  # trained_coefficients, without a second pass over z
    d = s + left.lam
    np_dtype = np.dtype(dtype)
    if plan.method == "chebyshev":
        lo, hi = plan.interval
        alpha = 2.0 / (hi - lo) if hi > lo else 0.0
        d_hat = alpha * d - (hi + lo) * alpha / 2
        direct = z.shape[1] >= DIRECT_MIN_K
        if direct:
            d_hat = d_hat.astype(np_dtype)
        else:
            v = chebyshev_vandermonde(d_hat, len(coeffs) - 1).astype(np_dtype)
        block_size = left_out_block_size(z.shape[1], len(d), block_size)

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        todo = samples if samples is not None else range(n)
        for start in range(todo.start, todo.stop, block_size):
            stop = min(start + block_size, todo.stop)
            zb = z[start:stop].astype(np_dtype, copy=False)
            b = rhs - np.einsum("bkr,bk->br", z[start:stop], residual[start:stop])
            if plan.method == "woodbury":
                c_left = woodbury_solve(d, zb, b)
            elif direct:
                c_left = chebyshev_left_out_direct(d_hat, alpha, zb, b.astype(np_dtype), coeffs.astype(np_dtype))
            else:
                c_left = chebyshev_left_out(v, alpha, zb, b.astype(np_dtype), coeffs.astype(np_dtype))
            yield start, c_full - c_left.astype(np.float64)

    return plan, blocks()
