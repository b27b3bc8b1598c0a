"""The in-memory estimate (sui_core.linearized.estimate) against retraining the linearized network from scratch."""

import numpy as np
import torch

from sui_core.config import JacobianConfig, ModelConfig
from sui_core.linearized.estimate import projected_jacobians, unique_information
from sui_core.linearized.reference import brute_force_deltas
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model


def test_unique_information_equals_brute_force_linear_retraining():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mlp", hidden=[16], init_seed=2), [1, 4, 4], 3).double()
    x, x_val = torch.rand(30, 1, 4, 4, dtype=torch.float64), torch.rand(12, 1, 4, 4, dtype=torch.float64)
    y = np.eye(3)[np.arange(30) % 3]
    recipe = Recipe(lr=0.2, weight_decay=0.01, t=300, dynamics="discrete")
    cfg = JacobianConfig(projection="none")
    est = unique_information(model, x, y, x_val, recipe, cfg)

    f0, phi = projected_jacobians(model, x, cfg)
    _, phi_val = projected_jacobians(model, x_val, cfg)
    n = len(x)
    dw = brute_force_deltas(phi, y - f0, recipe.full(n), recipe.left_out(n), range(n))
    dval = np.einsum("vkd,id->ivk", phi_val, dw)
    np.testing.assert_allclose(est.forms["dv_sq"], (dw**2).sum(1), rtol=1e-7)
    np.testing.assert_allclose(est.forms["fsi_sum"], (dval**2).sum((1, 2)), rtol=1e-7)
    np.testing.assert_allclose(est.scores["fsi"], (dval**2).sum((1, 2)) / (2 * len(x_val)), rtol=1e-7)
