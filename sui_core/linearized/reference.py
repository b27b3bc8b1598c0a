"""Slow, independent references for the leave-one-out solver and the real retraining: used by the
tests and the benchmarks.

Nothing here shares code with `sui_core.linearized.solver` beyond `GradientDescent.factor` (the scalar g):
each left-out problem is built and solved from scratch; `sgd_trained` is the plain PyTorch loop that
`sui_core.network.training` must agree with.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from sui_core.linearized.solver import GradientDescent


def sgd_trained(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    keep=None,
) -> torch.nn.Module:
    """What a user writes: a copy of `model` trained by full-batch torch.optim.SGD on the mean loss
    ½·mean‖f(x) − y‖² over the kept samples (`keep`: mask or indices; None = all), weight decay towards
    w0 as an explicit penalty."""
    net = copy.deepcopy(model)
    if keep is not None:
        x, y = x[keep], y[keep]
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((net(x) - y) ** 2).sum(-1).mean()
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(((p - p0) ** 2).sum() for p, p0 in zip(net.parameters(), w0))
        loss.backward()
        opt.step()
    return net


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


def brute_force_deltas(
    phi: np.ndarray, residual: np.ndarray, full: GradientDescent, left: GradientDescent, indices
) -> np.ndarray:
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


def _kernel_time_factor(s: np.ndarray, gd: GradientDescent) -> np.ndarray:
    """The paper's e^{−η t (Θ+λI)} (continuous) or (I − η(Θ+λI))^t (discrete) on Θ's eigenvalues s;
    0 for t = ∞."""
    h = s + gd.lam
    if np.isinf(gd.t):
        return np.zeros_like(h)
    if gd.dynamics == "continuous":
        return np.exp(-gd.eta * gd.t * h)
    return np.power(1.0 - gd.eta * h, gd.t)


def paper_kernel_deltas(
    phi: np.ndarray,
    residual: np.ndarray,
    full: GradientDescent,
    left: GradientDescent,
    indices,
    phi_val: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The paper's own algorithm (section 5 "Efficient implementation", Appendix E), in kernel space.

    With the NTK Θ = ΦΦᵀ (nk×nk) the trained model is (eq. 10/11, with weight decay Appendix F eq. 50/53)
    α = (Θ + λI)⁻¹ (I − E) r, w − w0 = Φᵀα and f(x) = f0(x) + Θ(x, X) α, where E = e^{−ηt(Θ+λI)} for
    gradient flow and (I − η(Θ+λI))^t for t discrete steps. For each left-out sample i:

    - (Θ₋ᵢ + λ'I)⁻¹ = A11⁻¹ is downdated from (Θ + λ'I)⁻¹ by the block-inverse formula (Appendix E,
      eq. 27–30): A11⁻¹ = F11⁻¹ − F11⁻¹A12 (A22 + A21 F11⁻¹ A12)⁻¹ A21 F11⁻¹, with F11⁻¹ the kept block of
      (Θ + λ'I)⁻¹ and A12, A21, A22 blocks of Θ + λ'I (O(n²k²) per sample);
    - E₋ᵢ is recomputed from an eigendecomposition of the downdated (n−1)k × (n−1)k kernel Θ₋ᵢ
      (O(n³k³) per sample; the paper cites an O(n²k²) eigendecomposition downdate (Gu & Eisenstat
      1995) instead, which this reference does not implement).

    Returns Δw_i = w − w₋ᵢ (m, D) and, with phi_val (n_val, k, D), the change of the validation
    predictions f_w(x_val) − f_{w₋ᵢ}(x_val) (m, n_val·k) computed in function space through Θ(x_val, X).
    `full` and `left` are the recipes on n and n − 1 samples (they differ in η and λ, see `Recipe`).
    Needs Θ + λ'I invertible (λ' > 0, or nk ≤ D with Θ of full rank); float64 throughout, so its accuracy
    degrades with Θ's condition number (the explicit inverse).
    """
    rows = phi.reshape(-1, phi.shape[-1]).astype(np.float64)
    n = phi.shape[0]
    k = rows.shape[0] // n
    r = residual.reshape(-1).astype(np.float64)
    theta = rows @ rows.T
    nk = theta.shape[0]
    eye = np.eye(nk)

    s, u = np.linalg.eigh(theta)
    alpha = np.linalg.solve(theta + full.lam * eye, r - u @ (_kernel_time_factor(s, full) * (u.T @ r)))
    theta_left = theta + left.lam * eye
    inv_left = np.linalg.inv(theta_left)  # (Θ + λ'I)⁻¹, downdated per sample below
    kernel_val = None if phi_val is None else phi_val.reshape(-1, phi.shape[-1]).astype(np.float64) @ rows.T

    dws, dvals = [], []
    for i in indices:
        drop = np.arange(i * k, (i + 1) * k)
        keep = np.setdiff1d(np.arange(nk), drop)
        f11_inv = inv_left[np.ix_(keep, keep)]
        a12 = theta_left[np.ix_(keep, drop)]
        a22 = theta_left[np.ix_(drop, drop)]
        f_a12 = f11_inv @ a12
        a11_inv = f11_inv - f_a12 @ np.linalg.solve(a22 + a12.T @ f_a12, f_a12.T)  # eq. 30 (A21 = A12ᵀ)
        s_i, u_i = np.linalg.eigh(theta[np.ix_(keep, keep)])
        r_i = r[keep]
        alpha_i = a11_inv @ (r_i - u_i @ (_kernel_time_factor(s_i, left) * (u_i.T @ r_i)))
        d_alpha = alpha.copy()
        d_alpha[keep] -= alpha_i
        dws.append(rows.T @ d_alpha)
        if kernel_val is not None:
            dvals.append(kernel_val @ d_alpha)
    dim = rows.shape[1]
    dw = np.array(dws).reshape(-1, dim)
    dval = None if kernel_val is None else np.array(dvals).reshape(-1, kernel_val.shape[0])
    return dw, dval
