"""Leave-one-out along the real training run: the first-order effect of each sample's weight on the
outputs of the *real* network after full-batch gradient descent, every second-order term included.

The recipe (`sui_core.network.training`) runs, from w0, T steps w_{s+1} = w_s − lr ∇L(w_s; a) on

    L(w; a) = Σ_j a_j ℓ_j(w) / Σ_j a_j + ½ λ ‖w − w0‖²,   ℓ_j = ½‖f_w(x_j) − y_j‖²,

with a = 1 for the full run; leaving sample i out is a = 1 − e_i (the mean over the n − 1 others).
Write a = 1 + ε. At ε = 0, ∂∇L/∂ε_i = (∇ℓ_i − ḡ)/n with ḡ = (1/n) Σ_j ∇ℓ_j (the renormalization of the
mean moves every other sample's weight by 1/n), so the run's derivative obeys

    ∂w_{s+1}/∂ε_i = (I − lr H_s) ∂w_s/∂ε_i − (lr/n) (∇ℓ_i(w_s) − ḡ(w_s)),   ∂w_0/∂ε_i = 0,

with H_s = ∇²L(w_s) the full Hessian of the mean loss (Gauss–Newton part JᵀJ/n, the residual part
Σ_j r_j ∇²f_j / n and λI). For one output direction u (a cotangent on the validation outputs) and
φ = uᵀ f_val(w_T), reverse mode gives the derivative for *every* sample at once: with the adjoint
β_T = J_val(w_T)ᵀ u and β_s = (I − lr H_s) β_{s+1},

    ∂φ/∂ε_i = −(lr/n) Σ_{s<T} [ (J_i(w_s) β_{s+1}) · e_i(w_s) − (1/n) Σ_j (J_j(w_s) β_{s+1}) · e_j(w_s) ],

e_j = f_{w_s}(x_j) − y_j (∇ℓ_i = J_iᵀ e_i). Each step back costs one forward-over-reverse product: the
tangent of ∇L (Hβ, a Hessian-vector product) and the tangent of the training outputs (Jβ, for every
sample at once) come out of the same `jvp`; m directions are vmapped together. Removing sample i is
ε_i = −1, so full − left-out ≈ +∂φ/∂ε_i: first order in the sample's weight 1/n, exact in everything
else (the network is not linearized anywhere). This is the estimator MAGIC (Ilyas & Engstrom 2025)
builds on: one backward pass through training per output direction.

The states w_s are needed in reverse order. They are not all kept (T × the parameter count): the
forward run keeps every C-th state (C ≈ √T) and each segment is recomputed once on the way back, so
the cost is 2T gradients + T forward-over-reverse products with m tangents, and the memory ≈ 2√T
states + m adjoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from tqdm import tqdm

from sui_core.network.training import Params, constants, trainable


@dataclass
class RunDerivatives:
    """What one reverse pass through the real run gives."""

    projections: torch.Tensor  # (m, n) float64: ∂(u_a · f_val(w_T))/∂ε_i ≈ change of direction a when i is left out
    train_outputs: torch.Tensor  # (n, k) the real network's outputs on the training set after T steps
    val_outputs: torch.Tensor  # (n_val, k) the same on the validation set
    seconds: float


def loo_along_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    directions: torch.Tensor,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    progress: bool | str = False,
) -> RunDerivatives:
    """Train the real network from its current weights (w0) for `steps` full-batch steps of the recipe,
    then run back through the run for the m output `directions` (m, n_val, k): returns, for every
    training sample i, the first-order change of u_a · f_val when i is left out (see the module docstring).
    Computed in the dtype of the model's parameters (float64 for tests, float32 for speed)."""
    if steps < 1:
        raise ValueError(f"the run needs at least one step, got {steps}")
    model = model.eval()
    started = time.perf_counter()
    w0, fixed = trainable(model), constants(model)
    dtype = next(iter(w0.values())).dtype
    x, y, x_val = x.to(dtype), torch.as_tensor(y).to(dtype), x_val.to(dtype)
    directions = directions.to(dtype)
    n = x.shape[0]
    if y.shape[0] != n or directions.shape[1:] != (x_val.shape[0], y.shape[1]):
        raise ValueError(
            f"shapes: x {tuple(x.shape)}, y {tuple(y.shape)}, x_val {tuple(x_val.shape)}, "
            f"directions {tuple(directions.shape)} (want (m, n_val, k))"
        )

    def outputs(params: Params, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params | fixed, (inputs,))

    def loss(params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        out = outputs(params, x)
        value = 0.5 * ((out - y) ** 2).sum(-1).mean()
        if weight_decay:
            value = value + 0.5 * weight_decay * sum(((params[k] - w0[k]) ** 2).sum() for k in params)
        return value, out

    loss_grad = grad(loss, has_aux=True)  # (∇L, training outputs)

    def step(params: Params) -> Params:
        g, _ = loss_grad(params)
        return {name: p - lr * g[name] for name, p in params.items()}

    def tangents(params: Params, adjoint: Params) -> tuple[Params, torch.Tensor]:
        """(H β, J_train β) for one adjoint β at `params`: one forward-over-reverse pass."""
        _, (h_beta, j_beta) = jvp(loss_grad, (params,), (adjoint,))
        return h_beta, j_beta

    batched_tangents = vmap(tangents, in_dims=(None, 0))
    segment = max(1, math.isqrt(steps))
    # forward, the segments recomputed (all but their first state) and the steps back
    bar = tqdm(total=3 * steps - math.ceil(steps / segment), disable=not progress, unit="step", leave=False)
    bar.set_description(progress if isinstance(progress, str) else "trained loo")
    with torch.no_grad():
        checkpoints = {0: w0}
        params = w0
        for s in range(steps):
            params = step(params)
            if (s + 1) % segment == 0 and s + 1 < steps:
                checkpoints[s + 1] = params
            bar.update()
        trained = params
        _, pull_back = vjp(lambda p: outputs(p, x_val), trained)
        (adjoint,) = vmap(pull_back)(directions)  # β_T = J_val(w_T)ᵀ u, one per direction
        train_out, val_out = outputs(trained, x), outputs(trained, x_val)
        total = torch.zeros(directions.shape[0], n, dtype=torch.float64)
        for start in sorted(checkpoints, reverse=True):
            states = [checkpoints[start]]
            for _ in range(start + 1, min(start + segment, steps)):
                states.append(step(states[-1]))
                bar.update()
            for state in reversed(states):  # w_s for s = end − 1 … start, with β_{s+1} in `adjoint`
                h_beta, j_beta = batched_tangents(state, adjoint)
                error = outputs(state, x) - y
                per_sample = (j_beta * error).sum(-1)  # (m, n): (J_i β) · e_i
                total -= (lr / n) * (per_sample - per_sample.mean(1, keepdim=True)).double()
                adjoint = {name: a - lr * h_beta[name] for name, a in adjoint.items()}
                bar.update()
    bar.close()
    return RunDerivatives(total, train_out, val_out, time.perf_counter() - started)
