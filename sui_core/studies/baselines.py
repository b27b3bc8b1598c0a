"""Per-sample scores of the real network that users compare sui's scores with.

All three use the pipeline's loss ½‖f_w(x) − y‖² on the regression targets of `sui_core.network.outputs.targets`
(the label itself for two classes, one output; one-hot otherwise) and train, where they train, with
`sui_core.network.training.train_full_batch`: full-batch SGD on the mean loss, weight decay towards w0.

- `training_loss`: ½‖f_w(x_i) − y_i‖² of the network trained with the recipe (lr, steps, weight decay)
  from one w0. High = the trained net does not fit the sample (a mislabel detector).
- `el2n` (Paul et al. 2021, "Deep learning on a data diet"): the error L2 norm ‖f_w(x_i) − y_i‖ after
  a few early training steps, averaged over init seeds. The paper's error vector is softmax(f) − onehot(y);
  the pipeline's networks are trained by MSE on raw outputs, so the error vector here is the raw
  residual f − y (k outputs; for two classes the scalar |f − y|). Low = easy sample, pruned first.
- `grand` (same paper): E over init seeds of the per-sample gradient norm ‖∇_w ℓ_i(w)‖, ℓ_i = ½‖f_w(x_i) − y_i‖²,
  over the trained (requires_grad) parameters, at w0 or after `steps` early steps. Low = pruned first.

A model builder `build(seed) -> nn.Module` gives the network at w0 for an init seed (`seeded_builder`
makes one from a ModelConfig); every score is a float64 numpy array (n,). `real_network_scores` runs the
chosen ones (and cleanlab's confident learning, `sui_core.studies.detection`) for the evaluate and
suspects stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from sui_core.config import DetectionConfig, ModelConfig, TrainingConfig
from sui_core.errors import ParamError
from sui_core.network.models import architecture, build_model
from sui_core.network.outputs import targets
from sui_core.network.training import Params, constants, predict, train_full_batch, trainable, unstack

Builder = Callable[[int], nn.Module]


def seeded_builder(cfg: ModelConfig, input_shape, num_outputs: int, double: bool = False) -> Builder:
    """build(seed): `cfg`'s network with init_seed = seed (float64 if `double`)."""

    def build(seed: int) -> nn.Module:
        model = build_model(dataclasses.replace(cfg, init_seed=int(seed)), input_shape, num_outputs)
        return model.double() if double else model

    return build


def _tensors(model: nn.Module, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = next(iter(trainable(model).values())).dtype
    x = torch.as_tensor(x).to(dtype)
    y = torch.as_tensor(y).to(dtype)
    if y.ndim == 1:
        y = y[:, None]
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    return x, y


def _trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, weight_decay: float) -> Params:
    """One run of the recipe on all of (x, y); w0 itself for steps = 0."""
    if steps < 0 or steps != int(steps):
        raise ValueError(f"steps must be a whole number >= 0, got {steps}")
    if steps == 0:
        return {name: p.unsqueeze(0) for name, p in trainable(model).items()}
    return train_full_batch(model, x, y, torch.ones(1, len(x)), lr, steps, weight_decay)


def training_loss(model: nn.Module, x, y, lr: float, steps: int, weight_decay: float = 0.0) -> np.ndarray:
    """½‖f_w(x_i) − y_i‖² of `model` (at w0) after `steps` full-batch steps of the recipe on (x, y)."""
    x, y = _tensors(model, x, y)
    out = predict(model, _trained(model, x, y, lr, steps, weight_decay), x)[0]
    return (0.5 * ((out - y) ** 2).sum(-1)).to(torch.float64).numpy()


def _mean_over_seeds(
    name: str,
    build: Builder,
    x,
    y,
    seeds: Sequence[int],
    progress: bool,
    score: Callable[[nn.Module, torch.Tensor, torch.Tensor], np.ndarray],
) -> np.ndarray:
    """Mean over init seeds of score(build(seed), x, y)."""
    if not seeds:
        raise ValueError(f"{name} needs at least one init seed")
    total = 0.0
    for seed in tqdm(seeds, desc=f"{name} seeds", disable=not progress, leave=False):
        model = build(seed)
        total = total + score(model, *_tensors(model, x, y))
    return total / len(seeds)


def el2n(
    build: Builder, x, y, seeds: Sequence[int], lr: float, steps: int, weight_decay: float = 0.0, progress: bool = False
) -> np.ndarray:
    """Mean over init seeds of ‖f_w(x_i) − y_i‖ after `steps` early full-batch steps from build(seed)."""

    def error_norm(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> np.ndarray:
        out = predict(model, _trained(model, xs, ys, lr, steps, weight_decay), xs)[0]
        return torch.linalg.vector_norm(out - ys, dim=-1).to(torch.float64).numpy()

    return _mean_over_seeds("el2n", build, x, y, seeds, progress, error_norm)


def gradient_norms(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """‖∇_w ½‖f_w(x_i) − y_i‖²‖ at `params` (unstacked trained parameters) for every sample i."""
    fixed = constants(model.eval())

    def sample_loss(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p | fixed, (xi.unsqueeze(0),))[0]
        return 0.5 * ((out - yi) ** 2).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    norms = []
    for lo in range(0, len(x), batch_size):
        grads = per_sample(params, x[lo : lo + batch_size], y[lo : lo + batch_size])
        sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
        norms.append(sq.sqrt().detach().to(torch.float64))
    return torch.cat(norms).numpy()


def grand(
    build: Builder,
    x,
    y,
    seeds: Sequence[int],
    lr: float = 0.0,
    steps: int = 0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Mean over init seeds of the per-sample gradient norm ‖∇_w ℓ_i‖ at build(seed)'s w0 (steps = 0,
    the paper's choice) or after `steps` early full-batch steps with `lr`."""

    def norms(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> np.ndarray:
        params = unstack(_trained(model, xs, ys, lr, steps, weight_decay), 0)
        return gradient_norms(model, params, xs, ys, batch_size)

    return _mean_over_seeds("grand", build, x, y, seeds, progress, norms)


def real_network_scores(
    model: nn.Module,
    info: dict,
    x: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    which: Sequence[str],
    training: TrainingConfig,
    detection: DetectionConfig,
    param: str,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The mislabel baselines `which` (loss | el2n | cleanlab) of the real network (`model` at w0, `info`
    its model.json) trained by the `training` recipe on (x, labels), higher = more suspect; and cleanlab's
    own issue set (None without cleanlab). EL2N and the cleanlab folds take their settings from `detection`.
    `param` names the setting that asked for them in the error for an unbounded training.t."""
    if not np.isfinite(training.t):
        raise ParamError(param, "real-network baselines need a finite training.t (steps to train)")
    steps = round(training.t)  # continuous dynamics: gradient flow for time lr·t ≈ t steps of lr
    from sui_core.studies import detection as cl  # detection's docstring derives the cleanlab baseline

    x = torch.as_tensor(x)
    y = torch.as_tensor(targets(labels, num_classes))
    lr, wd = training.lr, training.weight_decay
    found, issues = {}, None
    if "loss" in which:
        found["loss"] = training_loss(model, x, y, lr, steps, wd)
    if "el2n" in which:
        build = seeded_builder(architecture(info), info["input_shape"], info["num_outputs"])
        found["el2n"] = el2n(build, x, y, detection.el2n_seeds, lr, detection.el2n_steps, wd, progress=True)
    if "cleanlab" in which:
        found["cleanlab"], issues = cl.out_of_fold_confident_learning(
            model,
            x,
            y,
            labels,
            num_classes,
            detection.folds,
            detection.selection_seed,
            lr,
            steps,
            wd,
            progress="cleanlab folds",
        )
    return found, issues
