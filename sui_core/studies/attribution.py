"""Which training samples made a prediction: the exact change of every target prediction when each
training sample is left out, its proponents and opponents, and how far the effects add up.

**The effect matrix.** The linearized model trained by the recipe predicts at a target x
f_t(x) = f0(x) + Φ(x) v, and in the eigenbasis of the training Jacobians Φ(x) v = W(x) c, with W(x) the
target's rows in the basis (`Basis.val_rows`, or Φ_val through `val_rows_from_cross`) and c the trained
coefficients. Leaving training sample i out changes them by Δc_i = c − c₋ᵢ (the loo stage's solve,
`sui_core.linearized.solver.loo_deltas`), so the effect of sample i on target t is

    A[i, t] = f_t(x_t) − f₋ᵢ(x_t) = W_t Δc_i        (k numbers, one per output)

exactly for the linearized model — not an influence-function approximation of it: one product per block
of samples, O(n·m·k·r) for m targets. A[i, t] > 0: sample i pushes that output up.

**Support of the predicted class.** For one output (two classes, regression targets 0/1) the model
predicts class 1 where f_t(x_t) > ½, so the support of its prediction is s_t·A[i, t] with s_t = +1 for
class 1 and −1 for class 0; for k outputs it is the effect on the output of the predicted class.
Proponents of target t are the training samples of largest support (without them the prediction loses
most), opponents those of the most negative (without them it would be more confident).

**Do the effects add up?** Leaving every training sample out at once returns the model to w0, so the
joint effect of all of them is W_t c = f_t(x_t) − f0(x_t), exactly. Σ_i A[i, t] is what an additive
(linear-datamodel) view predicts for the same removal; `Attribution.additivity` is the ratio of the two
per target and output, 1 where single-sample effects add up.

**Checked by real retraining** (`retrained_support`, `sui explain --verify`): the real network trained by
the recipe on all samples and without one, stepped together; its support for the target's predicted
class, s·(f(x_t) − f₋ᵢ(x_t)) with the real outputs, beside the linearized estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sui_core.linearized.ntk import Basis
from sui_core.linearized.solver import Recipe, loo_deltas, trained_coefficients
from sui_core.network.training import predict, train_full_batch


@dataclass
class Attribution:
    """Per target (m of them): its prediction, the support of the predicted class by every training
    sample's removal summarized as the top proponents and opponents, and the additivity check."""

    prediction: np.ndarray  # (m, k) f_t(x_t) of the linearized model trained on all samples
    predicted: np.ndarray  # (m,) the predicted class
    proponents: np.ndarray  # (m, top) training rows (indices into the basis' samples), largest support first
    proponent_support: np.ndarray  # (m, top)
    opponents: np.ndarray  # (m, top) most negative support first
    opponent_support: np.ndarray  # (m, top)
    effect_sum: np.ndarray  # (m, k) Σ_i A[i, t]
    joint: np.ndarray  # (m, k) W_t c: the effect of leaving every training sample out at once

    @property
    def additivity(self) -> np.ndarray:
        """(m, k) Σ_i A[i, t] / W_t c (nan where the joint effect is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.joint != 0, self.effect_sum / self.joint, np.nan)


def predicted_class(prediction: np.ndarray) -> np.ndarray:
    """The class of each row of outputs (m, k): output > ½ for one output, the largest otherwise."""
    if prediction.shape[1] == 1:
        return (prediction[:, 0] > 0.5).astype(np.int64)
    return np.argmax(prediction, axis=1).astype(np.int64)


def support(effect: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(B, m) support of each target's predicted class from effects A (B, m, k) (module doc)."""
    if effect.shape[2] == 1:
        sign = np.where(predicted == 1, 1.0, -1.0)
        return effect[:, :, 0] * sign
    return np.take_along_axis(effect, predicted[None, :, None], axis=2)[:, :, 0]


def effect_blocks(
    basis: Basis,
    residual: np.ndarray,
    recipe: Recipe,
    target_rows: np.ndarray,
    tol: float = 1e-14,
    block_size: int = 256,
) -> Iterator[tuple[int, np.ndarray]]:
    """Iterator of (first training row, A block (B, m, k)): the effects of leaving each training sample
    out on every target (target_rows: W, (m, k, r) in the basis)."""
    n = basis.z.shape[0]
    _, blocks = loo_deltas(basis.s, basis.z, residual, recipe.full(n), recipe.left_out(n), tol, block_size)
    for start, delta in blocks:
        yield start, np.einsum("mkr,br->bmk", target_rows, delta)


def attribute(
    basis: Basis,
    residual: np.ndarray,
    f0_targets: np.ndarray,
    target_rows: np.ndarray,
    recipe: Recipe,
    top: int,
    tol: float = 1e-14,
    block_size: int = 256,
    on_block: Callable[[int, np.ndarray], None] | None = None,
) -> Attribution:
    """Proponents and opponents of every target (f0_targets (m, k): outputs at w0; target_rows W (m, k, r))
    by the exact leave-one-out effects (module doc), streamed over blocks of training samples;
    `on_block(start, A)` sees each block (e.g. to store the whole matrix)."""
    n = basis.z.shape[0]
    m, k, _ = target_rows.shape
    top = min(top, n)
    joint = np.einsum("mkr,r->mk", target_rows, trained_coefficients(basis.s, basis.z, residual, recipe.full(n)))
    prediction = f0_targets + joint
    predicted = predicted_class(prediction)
    best = (np.zeros((m, 0), np.int64), np.zeros((m, 0)))
    worst = (np.zeros((m, 0), np.int64), np.zeros((m, 0)))
    total = np.zeros((m, k))
    for start, effect in effect_blocks(basis, residual, recipe, target_rows, tol, block_size):
        if on_block is not None:
            on_block(start, effect)
        total += effect.sum(0)
        rows = np.broadcast_to(np.arange(start, start + len(effect))[None, :], (m, len(effect)))
        sup = support(effect, predicted).T  # (m, B)
        best = _keep_top(np.concatenate([best[0], rows], 1), np.concatenate([best[1], sup], 1), top)
        worst = _keep_top(np.concatenate([worst[0], rows], 1), np.concatenate([-worst[1], -sup], 1), top)
        worst = (worst[0], -worst[1])  # kept by the largest negated support: the most negative first
    return Attribution(prediction, predicted, best[0], best[1], worst[0], worst[1], total, joint)


def _keep_top(rows: np.ndarray, values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `values` (m, c) the `top` largest, descending (ties: the smaller training row first)."""
    order = np.lexsort((rows, -values), axis=1)[:, :top]
    return np.take_along_axis(rows, order, 1), np.take_along_axis(values, order, 1)


def retrained_support(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    x_target: np.ndarray,
    predicted: int,
    left_out: int,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
) -> float:
    """The real network's support of the target's `predicted` class by training row `left_out`: the recipe
    (`steps` full-batch steps from `model`'s w0) on all of (x, y) and without that row, both runs stepped
    together, then s·(f(x_t) − f₋ᵢ(x_t)) as in `support`."""
    weights = torch.ones(2, len(x))
    weights[1, left_out] = 0.0
    params = train_full_batch(model, torch.as_tensor(x), torch.as_tensor(y), weights, lr, steps, weight_decay)
    out = predict(model, params, torch.as_tensor(x_target[None])).to(torch.float64).numpy()[:, 0]  # (2, k)
    effect = (out[0] - out[1])[None, None, :]
    return float(support(effect, np.array([predicted]))[0, 0])
