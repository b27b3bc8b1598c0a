"""Adversarial training examples (paper A.7): FGSM images against a network trained on the clean data.

`data.adversarial: {fraction, epsilon, hidden, lr, steps}` replaces a seeded `fraction` of the
training images by x + ε·sign(∇ₓ ½‖f(x) − y‖²) (fast gradient sign method, Goodfellow et al. 2015),
clipped to the value range of the training images, where f is an MLP with one hidden layer of
`hidden` ReLU units (init seed data.seed) trained by real full-batch gradient descent
(`sui_core.network.training`, lr, steps) on the clean training labels, and y the clean label's regression
target (`sui_core.network.outputs.targets`). The attacked network is a fixed, separate model so that the data a
run sees depend on the data params alone (prepare does not read the model section). The image keeps
its clean label; `adversarial` marks it in the prepared splits and in scores.parquet. Applied before
label noise, so a replaced image may also get a flipped label.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad

from sui_core.config import ModelConfig
from sui_core.network.models import build_model
from sui_core.network.outputs import num_outputs, targets
from sui_core.network.training import Params, constants, train_full_batch, unstack


def fgsm(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, epsilon: float, lo: float, hi: float
) -> torch.Tensor:
    """x + ε·sign(∇ₓ ½‖f(x) − y‖²) per sample, clipped to [lo, hi]. The network is in eval mode, so
    each sample's gradient depends on that sample alone."""
    fixed = constants(model.eval())

    def loss(xb: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((functional_call(model, params | fixed, (xb,)) - y) ** 2).sum()

    return (x + epsilon * torch.sign(grad(loss)(x))).clamp(lo, hi)


def attacked_network(
    x: np.ndarray, clean_label: np.ndarray, num_classes: int, hidden: int, lr: float, steps: int, seed: int
) -> tuple[nn.Module, Params, torch.Tensor]:
    """The MLP the examples are made against, trained on the clean labels; returns it, its trained
    parameters and the targets."""
    model = build_model(
        ModelConfig(arch="mlp", hidden=[hidden], init_seed=seed), list(x.shape[1:]), num_outputs(num_classes)
    )
    xs = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(targets(clean_label, num_classes), dtype=torch.float32)
    params = train_full_batch(model, xs, y, torch.ones(1, len(xs)), lr, steps, progress="attacked network")
    return model, unstack(params, 0), y


def replace_by_fgsm(
    x: np.ndarray,
    clean_label: np.ndarray,
    num_classes: int,
    fraction: float,
    epsilon: float,
    hidden: int,
    lr: float,
    steps: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """New inputs with a seeded round(fraction·n) of them replaced by FGSM images, and the boolean flag."""
    model, params, y = attacked_network(x, clean_label, num_classes, hidden, lr, steps, seed)
    chosen = np.random.default_rng([seed, 7]).choice(len(x), round(fraction * len(x)), replace=False)
    flag = np.zeros(len(x), bool)
    flag[chosen] = True
    xs = torch.as_tensor(x, dtype=torch.float32)
    adv = fgsm(model, params, xs[chosen], y[chosen], epsilon, float(x.min()), float(x.max()))
    out = np.array(x, dtype=np.float32, copy=True)
    out[chosen] = adv.detach().numpy()
    return out, flag
