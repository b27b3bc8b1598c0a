"""Faithfulness: sui's estimates against really retraining the network without each sample (the paper's Table 1).

Ground truth (`retrain`): the network itself, not its linearization, is trained by full-batch gradient
descent with exactly the recipe the linearized model assumes (sui_core.network.training: mean loss ½·mean‖f − y‖²,
lr, steps, weight decay towards w0) on all n samples and on all but each of m sampled ones (one
`train_full_batch` call). For each left-out sample i it records

    weights      ‖w − w₋ᵢ‖²                        over all trained parameters
    predictions  Σ_j ‖f_w(x_j) − f_{w₋ᵢ}(x_j)‖²    over the validation set

Estimates of the same two numbers, each timed:

- `sui`: the closed form for the network linearized at w0 with the exact kernel (estimate.linearize,
  from layer factors as `jacobian.projection: exact`): forms dv_sq (2σ²·SI isotropic) and fsi_sum (2σ²·n_val·F-SI).
- `sui_trained` (loo.estimator trained, beyond the paper): F-SI of the real training run, followed
  in `trained_directions` output directions by one reverse pass through the run
  (sui_core.network.trajectory), the linearized change outside them; its weights change stays the
  linearized one. Timed with the linearized solve it builds on.
- `sui_checkpoint` (beyond the paper): the same closed form linearized at w_{t0}, the real full-data
  run after t0 steps, for the remaining t − t0 steps. It neglects what leaving sample i out changes
  during the first t0 steps (both runs start from w_{t0}); with weight decay it also pulls towards
  w_{t0} instead of w0.
- `if_exact`, `if_lissa`: influence functions at the trained full-data weights w. Removing z_i from
  the mean loss moves the minimizer by Δᵢ = (1/n) H⁻¹ ∇ℓᵢ(w) (ℓᵢ = ½‖f(xᵢ) − yᵢ‖², H the Hessian of
  the mean loss plus weight decay); predictions change by J_val Δᵢ (a jvp). `if_exact` solves with
  the explicit Hessian (torch.func.hessian, small nets) + damping·I; `if_lissa` runs the recursion of
  Agarwal et al. as Koh & Liang implement it, h ← g + (1 − damping)·h − H_B h / scale on a fresh
  mini-batch B per step, Δ = h / (n·scale): its fixed point is (H + damping·scale·I)⁻¹ g / n. As in
  the paper, damping is used only when weight_decay = 0.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap
from tqdm import tqdm

from sui_core import plots
from sui_core.config import JacobianConfig, TrainingConfig, ValidateConfig
from sui_core.data.splits import Split
from sui_core.errors import ArtifactError, ParamError
from sui_core.io import write_parquet
from sui_core.linearized.estimate import Estimate, linearize, trained_estimate
from sui_core.linearized.solver import Recipe
from sui_core.network.outputs import targets
from sui_core.network.training import Params, constants, flat, predict, train_full_batch
from sui_core.studies.datamodels import DatamodelScore, datamodel_score

EXACT_KERNEL = JacobianConfig(projection="exact")


@dataclass
class Changes:
    """What leaving each sampled training example out changes (real, or as a method estimates it)."""

    weights: np.ndarray  # (m,) ‖w − w₋ᵢ‖²
    predictions: np.ndarray  # (m,) Σ_j ‖f_w(x_j) − f_{w₋ᵢ}(x_j)‖² over the validation set
    seconds: float


@dataclass
class Retrained:
    changes: Changes
    params: Params  # the full-data run's trained parameters
    checkpoint: Params | None  # the full-data run after `checkpoint_step` steps
    loss_start: float  # ½·mean‖f − y‖² of the full-data run at w0 and at the end
    loss_end: float
    distance_sq: float  # ‖w − w0‖² of the full-data run


@dataclass
class Validation:
    left_out: np.ndarray  # (m,) indices into the training set
    truth: Retrained
    estimates: dict[str, Changes]
    spectrum: dict[str, np.ndarray]  # eigenvalues of the mean-loss NTK at w0 (and at the checkpoint)
    checkpoint_step: int | None
    notes: list[str] = field(default_factory=list)  # methods skipped, and why
    datamodels: DatamodelScore | None = None  # the LDS comparison, when asked for

    def table(self) -> list[dict]:
        return [{"method": name, **agreement(self.truth.changes, est)} for name, est in self.estimates.items()]


def sample_left_out(n: int, m: int, seed: int) -> np.ndarray:
    """m distinct training indices, seeded, sorted."""
    if not 1 <= m <= n:
        raise ValueError(f"cannot leave out {m} of {n} samples")
    return np.sort(np.random.default_rng([seed, 4]).choice(n, m, replace=False))


def retrain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    left_out: np.ndarray,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    checkpoint_step: int | None = None,
    progress: bool = False,
) -> Retrained:
    """Train the real network on all samples (run 0) and without each of `left_out` (runs 1..m), in the
    model's dtype; the changes each removal makes."""
    n = len(x)
    masks = torch.ones(len(left_out) + 1, n)
    masks[torch.arange(1, len(left_out) + 1), torch.as_tensor(left_out)] = 0
    kept: Params = {}

    def keep_checkpoint(step: int, params: Params, first_run: int) -> None:
        if step == checkpoint_step and first_run == 0:
            kept.update({name: p[0].clone() for name, p in params.items()})

    started = time.perf_counter()
    params = train_full_batch(
        model,
        x,
        y,
        masks,
        lr,
        steps,
        weight_decay,
        callback=keep_checkpoint if checkpoint_step else None,
        progress="retrain" if progress else False,
    )
    w = flat(params)
    weights = (w[1:] - w[0]).double().pow(2).sum(1)
    out_val = predict(model, params, x_val).double()
    predictions = (out_val[1:] - out_val[0]).pow(2).sum((1, 2))
    seconds = time.perf_counter() - started
    full = {name: p[:1] for name, p in params.items()}
    w0 = {name: p.detach().unsqueeze(0) for name, p in model.named_parameters() if name in params}
    out_train = predict(model, full, x).double()[0]
    out_w0 = predict(model, w0, x).double()[0]
    y64 = y.double()
    return Retrained(
        Changes(weights.numpy(), predictions.numpy(), seconds),
        {name: p[0] for name, p in params.items()},
        kept or None,
        float(0.5 * (out_w0 - y64).pow(2).sum(1).mean()),
        float(0.5 * (out_train - y64).pow(2).sum(1).mean()),
        float((w[0] - flat(w0)[0]).double().pow(2).sum()),
    )


def linearized(
    model: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    x_val: torch.Tensor,
    recipe: Recipe,
    left_out: np.ndarray,
    trained_directions: int = 0,
) -> tuple[Changes, Estimate, Changes | None]:
    """sui's closed-form leave-one-out changes of the network linearized at its current weights (exact
    kernel; every sample is solved, the sampled ones are kept), the estimate they come from (its basis'
    eigenvalues / n are those of the mean-loss NTK: the stability bound is lr·max < 2), and with
    `trained_directions` > 0 the trained estimator's changes (its F-SI from the real run; its
    weights part stays linearized), timed with the linearized part it builds on."""
    started = time.perf_counter()
    est = linearize(model, x, x_val, EXACT_KERNEL).estimate(y, recipe)
    basis, residual = est.basis, np.asarray(y, dtype=np.float64).reshape(est.f0.shape) - est.f0
    seconds = time.perf_counter() - started
    changes = Changes(est.forms["dv_sq"][left_out], est.forms["fsi_sum"][left_out], seconds)
    if not trained_directions:
        return changes, est, None
    steps = int(recipe.t)
    trained = trained_estimate(
        model, x, y, x_val, recipe, steps, basis, basis.val_rows, residual, est.forms, est.fit, trained_directions
    )
    forms = trained.forms
    elapsed = time.perf_counter() - started
    return changes, est, Changes(forms["dv_sq"][left_out], forms["fsi_sum"][left_out], elapsed)


def with_params(model: nn.Module, params: Params) -> nn.Module:
    """A copy of `model` whose trained parameters are `params`."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in params:
                p.copy_(params[name])
    return moved


class FlatNetwork:
    """The network and its mean loss as functions of one flat vector θ of its trained parameters."""

    def __init__(self, model: nn.Module, params: Params, w0: Params, weight_decay: float):
        self.model = model.eval()
        self.fixed = constants(model)
        self.names = sorted(params)
        self.shapes = [params[name].shape for name in self.names]
        self.theta = torch.cat([params[name].reshape(-1) for name in self.names])
        self.theta0 = torch.cat([w0[name].reshape(-1) for name in self.names])
        self.weight_decay = weight_decay

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, [s.numel() for s in self.shapes])
        named = {name: part.view(shape) for name, part, shape in zip(self.names, parts, self.shapes)}
        return functional_call(self.model, named | self.fixed, (x,))

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """½·mean‖f − y‖² over (x, y) + ½·weight_decay·‖θ − θ0‖²."""
        value = 0.5 * (self(theta, x) - y).pow(2).sum(-1).mean()
        return value + 0.5 * self.weight_decay * (theta - self.theta0).pow(2).sum()

    def sample_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇ℓᵢ(θ) of ℓᵢ = ½‖f(xᵢ) − yᵢ‖² for each row: (len(x), d)."""

        def one(xi, yi):
            return grad(lambda th: 0.5 * (self(th, xi[None]) - yi[None]).pow(2).sum())(self.theta)

        return vmap(one)(x, y)

    def changes(self, delta: torch.Tensor, x_val: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """‖Δᵢ‖² and Σ_j ‖J(x_j) Δᵢ‖² for each row Δᵢ of `delta` (jvp at θ)."""

        def tangent(d):
            return jvp(lambda th: self(th, x_val), (self.theta,), (d,))[1]

        moved = torch.stack([tangent(d) for d in delta]).double()
        return delta.double().pow(2).sum(1).numpy(), moved.pow(2).sum((1, 2)).numpy()


def influence_exact(
    net: FlatNetwork, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, left_out: np.ndarray, damping: float
) -> Changes:
    """Δᵢ = (1/n) (H + damping·I)⁻¹ ∇ℓᵢ with the explicit Hessian H of the mean loss (+ weight decay)."""
    started = time.perf_counter()
    h = hessian(lambda th: net.loss(th, x, y))(net.theta)
    h = (h + h.T) / 2 + damping * torch.eye(len(net.theta), dtype=h.dtype)
    g = net.sample_gradients(x[left_out], y[left_out])
    delta = torch.linalg.solve(h.double(), g.double().T).T.to(g.dtype) / len(x)
    weights, predictions = net.changes(delta, x_val)
    return Changes(weights, predictions, time.perf_counter() - started)


def influence_lissa(
    net: FlatNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    left_out: np.ndarray,
    depth: int,
    scale: float,
    damping: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> Changes:
    """LiSSA (Koh & Liang's recursion, see the module docstring) for all m right-hand sides at once:
    one mini-batch per step, its Hessian-vector products vmapped over the m vectors."""
    started = time.perf_counter()
    g = net.sample_gradients(x[left_out], y[left_out])
    rng = torch.Generator().manual_seed(seed)
    h = g.clone()
    for _ in tqdm(range(depth), desc="lissa", unit="step", leave=False, disable=not progress):
        batch = torch.randperm(len(x), generator=rng)[:batch_size]
        gradient = grad(lambda th: net.loss(th, x[batch], y[batch]))
        hvp = vmap(lambda v: jvp(gradient, (net.theta,), (v,))[1])(h)
        h = g + (1 - damping) * h - hvp / scale
    delta = h / (scale * len(x))
    weights, predictions = net.changes(delta, x_val)
    return Changes(weights, predictions, time.perf_counter() - started)


def agreement(truth: Changes, estimate: Changes) -> dict[str, float]:
    """Pearson and Spearman of an estimate against the retrained ground truth, for weights and
    predictions, its median ratio to the truth (< 1: biased low) and its time."""
    out: dict[str, float] = {}
    for kind in ("weights", "predictions"):
        real, est = getattr(truth, kind), getattr(estimate, kind)
        out[f"pearson_{kind}"] = float(pearsonr(est, real)[0])
        out[f"spearman_{kind}"] = float(spearmanr(est, real)[0])
        out[f"median_ratio_{kind}"] = float(np.median(est / real))
    out["seconds"] = estimate.seconds
    return out


def validate(
    model: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    x_val: torch.Tensor,
    recipe: Recipe,
    m: int,
    seed: int = 0,
    influence: tuple[str, ...] = ("exact", "lissa"),
    exact_max_params: int = 3000,
    lissa_depth: int = 1000,
    lissa_scale: float = 1000.0,
    lissa_damping: float = 0.01,
    lissa_batch_size: int = 32,
    checkpoint_fraction: float | None = None,
    trained_directions: int = 0,
    lds_subsets: int = 0,
    lds_fraction: float = 0.5,
    val_label: np.ndarray | None = None,
    progress: bool = False,
) -> Validation:
    """The whole comparison for one network and data set: m sampled samples, retrained ground truth,
    sui at w0 (and at a checkpoint), influence functions, and with `lds_subsets` > 0 the linear
    datamodeling score over that many random subsets keeping `lds_fraction` (sui_core.studies.datamodels;
    `val_label` picks each validation target's output for k > 1). Computed in the model's dtype."""
    if recipe.dynamics != "discrete" or not np.isfinite(recipe.t):
        raise ValueError("validation retrains with a whole number of gradient steps (discrete dynamics, finite t)")
    steps = int(recipe.t)
    dtype = next(model.parameters()).dtype
    x, x_val = x.to(dtype), x_val.to(dtype)
    y_t = torch.as_tensor(np.asarray(y), dtype=dtype)
    left_out = sample_left_out(len(x), m, seed)
    t0 = round(checkpoint_fraction * steps) if checkpoint_fraction else None
    if t0 is not None and not 0 < t0 < steps:
        raise ValueError(f"checkpoint step {t0} must lie strictly between 0 and t = {steps}")
    estimates, spectrum = {}, {}
    estimates["sui"], at_w0, trained = linearized(model, x, np.asarray(y), x_val, recipe, left_out, trained_directions)
    spectrum["w0"] = at_w0.basis.s / len(x)
    if trained is not None:
        estimates["sui_trained"] = trained
    if recipe.lr * (spectrum["w0"][0] + recipe.weight_decay) >= 2:  # before minutes of retraining
        raise ParamError(
            "training.lr",
            f"lr·(largest eigenvalue of the mean-loss NTK + weight_decay) = "
            f"{recipe.lr * (spectrum['w0'][0] + recipe.weight_decay):.3g} >= 2: gradient descent diverges",
        )
    truth = retrain(model, x, y_t, x_val, left_out, recipe.lr, steps, recipe.weight_decay, t0, progress)
    if t0 is not None:
        later = Recipe(recipe.lr, recipe.weight_decay, steps - t0, recipe.dynamics)
        estimates["sui_checkpoint"], at_checkpoint, _ = linearized(
            with_params(model, truth.checkpoint), x, np.asarray(y), x_val, later, left_out
        )
        spectrum["checkpoint"] = at_checkpoint.basis.s / len(x)
        estimates["sui_checkpoint"].seconds += truth.changes.seconds * t0 / steps / (m + 1)  # its share of one run
    w0 = {name: p.detach() for name, p in model.named_parameters() if name in truth.params}
    net = FlatNetwork(model, truth.params, w0, recipe.weight_decay)
    damping = lissa_damping if recipe.weight_decay == 0 else 0.0
    notes = []
    if "exact" in influence:
        if len(net.theta) <= exact_max_params:
            estimates["if_exact"] = influence_exact(net, x, y_t, x_val, left_out, damping)
        else:
            notes.append(f"if_exact skipped: {len(net.theta)} trained parameters > exact_max_params {exact_max_params}")
    if "lissa" in influence:
        estimates["if_lissa"] = influence_lissa(
            net,
            x,
            y_t,
            x_val,
            left_out,
            lissa_depth,
            lissa_scale,
            damping,
            min(lissa_batch_size, len(x)),
            seed,
            progress,
        )
    datamodels = None
    if lds_subsets:
        datamodels = datamodel_score(
            model,
            x,
            np.asarray(y),
            x_val,
            val_label,
            at_w0.basis,
            np.asarray(y, dtype=np.float64).reshape(at_w0.f0.shape) - at_w0.f0,
            recipe,
            lds_subsets,
            lds_fraction,
            seed,
            progress,
        )
    return Validation(left_out, truth, estimates, spectrum, t0, notes, datamodels)


def validate_splits(
    model: nn.Module, train: Split, val: Split, training: TrainingConfig, settings: ValidateConfig
) -> Validation:
    """`validate` on prepared splits with the validate section's settings: the network in its dtype,
    retrained for the recipe of `training` (a whole number of steps)."""
    training.whole_steps("validate")
    if settings.samples > len(train):
        raise ParamError(
            "validate.samples", f"must be at most the {len(train)} training samples, got {settings.samples}"
        )
    s = settings
    return validate(
        model.to(getattr(torch, s.dtype)),
        torch.as_tensor(train.x),
        targets(train.label, train.num_classes),
        torch.as_tensor(val.x),
        Recipe.from_config(training),
        s.samples,
        s.seed,
        tuple(s.influence),
        s.exact_max_params,
        s.lissa_depth,
        s.lissa_scale,
        s.lissa_damping,
        s.lissa_batch_size,
        s.checkpoint_fraction,
        s.trained_directions,
        s.lds_subsets,
        s.lds_fraction,
        val.label,
        progress=True,
    )


QUANTITIES = ("weights", "predictions")


def changes_from_forms(forms: dict[str, list], sample_id: np.ndarray) -> Changes:
    """The loo stage's σ-free forms (`sample_id`, `fsi_sum`, `dv_sq` columns) of the sampled samples (its
    Jacobians are projected: dv_sq covers the projected coordinates only); no time of its own."""
    row_of = {sid: i for i, sid in enumerate(forms["sample_id"])}
    missing = [int(s) for s in sample_id if s not in row_of]
    if missing:
        raise ArtifactError(f"the loo stage's forms hold no samples {missing[:5]} (rerun the loo stage)")
    rows = [row_of[s] for s in sample_id]
    return Changes(np.asarray(forms["dv_sq"])[rows], np.asarray(forms["fsi_sum"])[rows], float("nan"))


def write_report(
    truth: Retrained, estimates: dict[str, Changes], sample_id: np.ndarray, noisy: np.ndarray, out: Path
) -> tuple[list[dict], dict[str, float]]:
    """Per-sample real vs estimated changes (changes.parquet), the agreement of each method (table.parquet,
    table.md) and their scatter plot under `out`; returns the table's rows and the metrics."""
    rows = [{"method": name, **agreement(truth.changes, est)} for name, est in estimates.items()]
    columns = {"sample_id": sample_id, "noisy": noisy, **{f"real_{q}": getattr(truth.changes, q) for q in QUANTITIES}}
    for name, est in estimates.items():
        columns.update({f"{name}_{q}": getattr(est, q) for q in QUANTITIES})
    write_parquet(out / "changes.parquet", pa.table(columns))
    write_parquet(out / "table.parquet", pa.Table.from_pylist(rows))
    (out / "table.md").write_text(markdown(rows))
    plots.scatter_grid(
        {q: getattr(truth.changes, q) for q in QUANTITIES},
        {name: {q: getattr(est, q) for q in QUANTITIES} for name, est in estimates.items()},
        out / "plots" / "scatter.png",
        f"leave-one-out changes of {len(sample_id)} samples",
    )
    metrics = {
        f"{row['method']}_{key}": value
        for row in rows
        for key, value in row.items()
        if key != "method" and np.isfinite(value)
    }
    metrics.update(retrain_seconds=truth.changes.seconds, loss_end=truth.loss_end, distance_sq=truth.distance_sq)
    return rows, metrics


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | weights Pearson | weights Spearman | predictions Pearson | predictions Spearman | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['pearson_weights']:.3f} | {r['spearman_weights']:.3f} | "
        f"{r['pearson_predictions']:.3f} | {r['spearman_predictions']:.3f} | "
        f"{'–' if np.isnan(r['seconds']) else round(r['seconds'], 1)} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
