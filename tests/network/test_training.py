"""Batched full-batch training (sui_core.network.training) against plain torch.optim.SGD loops, one run at a time."""

import numpy as np
import pytest
import torch

from sui_core.config import ModelConfig
from sui_core.linearized.reference import sgd_trained
from sui_core.network.models import build_model
from sui_core.network.training import flat, predict, train_full_batch, unstack


@pytest.mark.parametrize("arch,weight_decay", [("mlp", 0.0), ("cnn", 0.05)])
def test_batched_runs_equal_separate_sgd_loops(arch, weight_decay):
    torch.manual_seed(0)
    n, shape = 24, [1, 20, 20]
    model = build_model(ModelConfig(arch=arch, hidden=[32], init_seed=1), shape, 2).double()
    x = torch.rand(n, *shape, dtype=torch.float64)
    y = torch.rand(n, 2, dtype=torch.float64)
    keeps = [np.ones(n, dtype=bool), np.arange(n) != 3, np.arange(n) % 3 != 0]
    weights = torch.tensor(np.array(keeps, dtype=np.float64))
    params = train_full_batch(model, x, y, weights, lr=0.05, steps=15, weight_decay=weight_decay, runs_per_batch=2)
    outputs = predict(model, params, x[:5])
    for run, keep in enumerate(keeps):
        ref = sgd_trained(model, x, y, 0.05, 15, weight_decay, keep)
        for name, p in ref.named_parameters():
            np.testing.assert_allclose(unstack(params, run)[name].numpy(), p.detach().numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(outputs[run].numpy(), ref(x[:5]).detach().numpy(), rtol=1e-9, atol=1e-12)
    assert flat(params).shape == (3, sum(p.numel() for p in model.parameters()))


def test_frozen_parameters_stay_at_w0():
    model = build_model(ModelConfig(arch="mlp", hidden=[8], freeze=["1"]), [1, 4, 4], 1).double()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "the freeze prefix matched nothing"
    x, y = torch.rand(10, 1, 4, 4, dtype=torch.float64), torch.rand(10, 1, dtype=torch.float64)
    params = train_full_batch(model, x, y, torch.ones(1, 10), lr=0.1, steps=5)
    assert not set(frozen) & set(params)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name])


def test_bad_sample_weights_are_refused():
    model = build_model(ModelConfig(arch="mlp", hidden=[4]), [1, 2, 2], 1)
    x, y = torch.rand(5, 1, 2, 2), torch.rand(5, 1)
    with pytest.raises(ValueError, match="sample_weights must be"):
        train_full_batch(model, x, y, torch.ones(2, 4), lr=0.1, steps=1)
    with pytest.raises(ValueError, match="positive sum"):
        train_full_batch(model, x, y, torch.zeros(1, 5), lr=0.1, steps=1)
