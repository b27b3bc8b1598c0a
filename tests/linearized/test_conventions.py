"""lr and weight_decay mean what they mean in PyTorch: SGD on the mean loss ½·mean‖f(x) − y‖².

Trains the linearized model with torch.optim.SGD on all samples and on all but one, and compares
with the solver driven by `Recipe` (η = lr/n, λ = n·wd; left out: lr/(n−1), (n−1)·wd)."""

import numpy as np
import pytest
import torch

from sui_core.linearized.ntk import build_basis
from sui_core.linearized.scores import loo_quadratic_forms
from sui_core.linearized.solver import Recipe


def sgd_train(phi, residual, lr, weight_decay, steps):
    """Full-batch torch SGD on the linear model r ≈ Φ v, starting at v = 0 (= w0)."""
    phi_t = torch.tensor(phi, dtype=torch.float64)
    target = torch.tensor(residual, dtype=torch.float64)
    v = torch.zeros(phi.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([v], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((phi_t @ v - target) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
    return v.detach().numpy()


@pytest.mark.parametrize("dim,weight_decay", [(8, 0.0), (8, 0.05), (60, 0.02)])
def test_recipe_matches_torch_sgd_on_mean_loss(dim, weight_decay):
    rng = np.random.default_rng(dim)
    n, k, steps, lr = 24, 2, 150, 0.05
    phi = rng.normal(size=(n, k, dim)) / np.sqrt(dim)
    residual = rng.normal(size=(n, k))
    recipe = Recipe(lr, weight_decay, steps, "discrete")
    basis = build_basis(lambda: [phi], lambda: [phi], n, k, dim)  # val = train: F-SI sums ‖ΦΔv‖²
    result = loo_quadratic_forms(basis, residual, recipe, batch_size=None, progress=False)

    v = sgd_train(phi, residual, lr, weight_decay, steps)
    for i in (0, 5, 23):
        keep = np.arange(n) != i
        dv = v - sgd_train(phi[keep], residual[keep], lr, weight_decay, steps)
        assert result.forms["dv_sq"][i] == pytest.approx(dv @ dv, rel=1e-9)
        want = np.sum((phi.reshape(-1, dim) @ dv) ** 2)
        assert result.forms["fsi_sum"][i] == pytest.approx(want, rel=1e-9)
