"""Real-network baseline scores (sui_core.studies.baselines) against explicit torch loops, one sample and
seed at a time."""

import numpy as np
import pytest
import torch

from sui_core.config import ModelConfig
from sui_core.linearized.reference import sgd_trained
from sui_core.studies.baselines import el2n, grand, seeded_builder, training_loss

SHAPE = [1, 20, 20]


def data(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=gen, dtype=torch.float64)
    labels = torch.arange(n) % max(k, 2)
    y = labels[:, None].double() if k == 1 else torch.eye(k, dtype=torch.float64)[labels]
    return x, y


@pytest.mark.parametrize("arch,k,weight_decay", [("mlp", 1, 0.0), ("cnn", 3, 0.02)])
def test_training_loss_is_half_squared_error_of_the_sgd_trained_net(arch, k, weight_decay):
    x, y = data(16, k)
    model = seeded_builder(ModelConfig(arch=arch, hidden=[24]), SHAPE, k, double=True)(3)
    got = training_loss(model, x, y, lr=0.05, steps=12, weight_decay=weight_decay)
    net = sgd_trained(model, x, y, 0.05, 12, weight_decay)
    want = [0.5 * float(((net(x[i : i + 1])[0] - y[i]) ** 2).sum().detach()) for i in range(len(x))]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-14)
    assert not np.allclose(got, training_loss(model, x, y, lr=0.05, steps=0)), "training changed nothing"


@pytest.mark.parametrize("k", [1, 3])
def test_el2n_is_the_seed_mean_of_early_error_norms(k):
    x, y = data(14, k)
    build = seeded_builder(ModelConfig(arch="mlp", hidden=[16]), SHAPE, k, double=True)
    seeds = [0, 5, 7]
    got = el2n(build, x, y, seeds, lr=0.1, steps=4)
    per_seed = []
    for seed in seeds:
        net = sgd_trained(build(seed), x, y, 0.1, 4)
        per_seed.append([float(torch.sqrt(((net(x[i : i + 1])[0] - y[i]) ** 2).sum()).detach()) for i in range(len(x))])
    np.testing.assert_allclose(got, np.mean(per_seed, axis=0), rtol=1e-9, atol=1e-14)
    # seeds matter (else the average would be pointless) and y may be a 1-d label vector for k = 1
    assert not np.allclose(per_seed[0], per_seed[1])
    if k == 1:
        np.testing.assert_allclose(el2n(build, x, y[:, 0], seeds, lr=0.1, steps=4), got, rtol=1e-12)


@pytest.mark.parametrize("steps", [0, 3])
def test_grand_is_the_seed_mean_of_per_sample_gradient_norms(steps):
    x, y = data(10, 2)
    # freeze the first layer: its parameters must not count in the gradient norm
    build = seeded_builder(ModelConfig(arch="mlp", hidden=[12], freeze=["1"]), SHAPE, 2, double=True)
    seeds = [1, 2]
    got = grand(build, x, y, seeds, lr=0.1, steps=steps, batch_size=4)
    per_seed = []
    for seed in seeds:
        net = sgd_trained(build(seed), x, y, 0.1, steps)
        norms = []
        for i in range(len(x)):
            net.zero_grad()
            (0.5 * ((net(x[i : i + 1])[0] - y[i]) ** 2).sum()).backward()
            norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in net.parameters() if p.requires_grad))))
        per_seed.append(norms)
    np.testing.assert_allclose(got, np.mean(per_seed, axis=0), rtol=1e-9)


def test_bad_arguments_are_refused():
    x, y = data(6, 1)
    build = seeded_builder(ModelConfig(arch="mlp", hidden=[4]), SHAPE, 1)
    with pytest.raises(ValueError, match="seed"):
        el2n(build, x, y, [], lr=0.1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        grand(build, x, y, [0], lr=0.1, steps=-1)
    with pytest.raises(ValueError, match="samples"):
        training_loss(build(0), x, y[:4], lr=0.1, steps=1)


@pytest.mark.parametrize("cls, section", [("DetectionConfig", "detection"), ("SuspectsConfig", "suspects")])
def test_cleanlab_missing_is_a_param_error_naming_the_install(monkeypatch, cls, section):
    """cleanlab is a peer, not a dependency: asking for it without it fails at once, saying how to get it."""
    import importlib.util

    from sui_core import config
    from sui_core.errors import ParamError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cleanlab" else real(name, *a))
    with pytest.raises(ParamError, match=rf"{section}\.baselines.*requirements-baselines\.lock"):
        config.from_dict(getattr(config, cls), {"baselines": ["loss", "cleanlab"]}, section)
    assert config.from_dict(getattr(config, cls), {"baselines": ["loss", "el2n"]}, section).baselines == [
        "loss",
        "el2n",
    ]
