"""Real training of the network (not its linearization): many full-batch gradient-descent runs at once.

Every run starts from the same w0 and sees the same data; what differs is a per-run sample weight
vector (0/1 to leave samples out, or any non-negative weights). Run m minimizes, in PyTorch terms,

    L_m(w) = ½ Σ_j a_mj ‖f_w(x_j) − y_j‖² / Σ_j a_mj  +  ½ weight_decay ‖w − w0‖²

by `steps` steps w ← w − lr ∇L_m(w): full-batch SGD on the mean loss over the kept samples, the recipe
the linearized model assumes (weight decay towards w0, as in `sui_core.linearized.solver`). Runs are stacked
along a leading axis, `runs_per_batch` at a time, and stepped together with torch.func (vmap of grad
over stacked parameters). On a GPU stacking all runs fills the device; on CPU it does not pay
(bench/bench_retrain.py, 11 runs: one at a time 3.5–4.4 s vs stacked 4.0–4.2 s for the MLP, 8.0 s vs
9.2–9.5 s for the CNN, whose stacked conv weights become grouped convolutions), so the default is one
run at a time on CPU and all at once on CUDA.

Only parameters with requires_grad are trained; frozen ones and buffers (batch-norm statistics, used
in eval mode) stay at w0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

Params = dict[str, torch.Tensor]


def trainable(model: nn.Module) -> Params:
    """The trained parameters of `model` by name (detached copies)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def constants(model: nn.Module) -> Params:
    """Frozen parameters and buffers: held at w0 by every run."""
    fixed = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    return fixed | {name: b.detach() for name, b in model.named_buffers()}


def stack(params: Params, runs: int) -> Params:
    return {name: p.unsqueeze(0).expand(runs, *p.shape).clone() for name, p in params.items()}


def unstack(params: Params, run: int) -> Params:
    return {name: p[run] for name, p in params.items()}


def train_full_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sample_weights: torch.Tensor,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    runs_per_batch: int | None = None,
    callback: Callable[[int, Params, int], None] | None = None,
    progress: bool | str = False,
) -> Params:
    """Train len(sample_weights) runs of `model` from its current weights (w0); returns the stacked
    trained parameters {name: (runs, *shape)}.

    x: (n, ...) inputs, y: (n, k) targets, sample_weights: (runs, n) non-negative, each row with a
    positive sum. `runs_per_batch` is how many runs are stepped together (memory: activations of
    runs_per_batch × n samples; None: 1 on CPU, all on CUDA). `callback(step, stacked_params,
    first_run)` is called after each step of each batch of runs (first_run: the index of the batch's
    first run), e.g. to keep checkpoints. Computed in the dtype of the model's parameters.
    """
    model = model.eval()
    dtype = next(iter(trainable(model).values())).dtype
    w0 = trainable(model)
    fixed = constants(model)
    x = x.to(dtype)
    y = y.to(dtype)
    weights = torch.as_tensor(sample_weights, dtype=dtype)
    if weights.ndim != 2 or weights.shape[1] != x.shape[0]:
        raise ValueError(f"sample_weights must be (runs, {x.shape[0]}), got {tuple(weights.shape)}")
    if (weights < 0).any() or not (weights.sum(1) > 0).all():
        raise ValueError("sample_weights must be non-negative with a positive sum in every run")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")

    def loss(params: Params, a: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params | fixed, (x,))
        per_sample = 0.5 * ((out - y) ** 2).sum(-1)
        value = (a * per_sample).sum() / a.sum()
        if weight_decay:
            value = value + 0.5 * weight_decay * sum(((params[k] - w0[k]) ** 2).sum() for k in params)
        return value

    batched_grads, single_grads = vmap(grad(loss)), grad(loss)

    def step_grads(params: Params, a: torch.Tensor) -> Params:
        if len(a) > 1:
            return batched_grads(params, a)
        # one run: plain grad, since vmap over a batch of one still pays for batched kernels (grouped convs)
        return {name: g.unsqueeze(0) for name, g in single_grads(unstack(params, 0), a[0]).items()}

    runs = weights.shape[0]
    if runs_per_batch is None:
        runs_per_batch = runs if x.is_cuda else 1
    size = max(1, min(runs, runs_per_batch))
    batches = math.ceil(runs / size)
    out: list[Params] = []
    bar = tqdm(
        total=batches * steps,
        disable=not progress,
        desc=progress if isinstance(progress, str) else "train",
        unit="step",
        leave=False,
    )
    with torch.no_grad():
        for start in range(0, runs, size):
            a = weights[start : start + size]
            params = stack(w0, a.shape[0])
            for step in range(steps):
                grads = step_grads(params, a)
                for name, g in grads.items():
                    params[name].sub_(g, alpha=lr)
                if callback is not None:
                    callback(step + 1, params, start)
                bar.update()
            out.append(params)
    bar.close()
    return {name: torch.cat([part[name] for part in out]) for name in w0}


def predict(model: nn.Module, params: Params, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Outputs of every stacked run on x: (runs, len(x), k)."""
    fixed = constants(model.eval())
    dtype = next(iter(params.values())).dtype
    x = x.to(dtype)

    def one(p: Params, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p | fixed, (xb,))

    with torch.no_grad():
        return torch.cat(
            [vmap(one, in_dims=(0, None))(params, x[i : i + batch_size]) for i in range(0, len(x), batch_size)], dim=1
        )


def flat(params: Params) -> torch.Tensor:
    """Stacked parameters as one (runs, d) matrix (names in sorted order)."""
    return torch.cat([params[name].flatten(1) for name in sorted(params)], dim=1)
