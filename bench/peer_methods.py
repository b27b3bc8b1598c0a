"""Peer data-attribution methods (Kronfluence, TRAK, dattri) behind one function.

Every peer is run on a small torch network with one scalar output that was trained by full-batch gradient
descent on ``mean_i 0.5 * (f(x_i) - y_i)^2`` (+ ``0.5 * weight_decay * ||w - w0||^2``) and returns, for every
training sample ``i`` and validation target ``j``, its estimate of

    tau[i, j] = f(x_j) - f_{-i}(x_j)

(positive = sample ``i`` pushes ``f(x_j)`` up; any positive scale factor is allowed).  The measurement is the raw
output ``f(x_j)``, never a loss.  Each adapter's docstring says how the peer's raw score is converted.

The peers are benchmark-only dependencies, installed outside the venv (see bench/requirements-peers.lock):

    .venv/bin/pip install --no-deps --target .cache/peers -r bench/requirements-peers.lock

``python bench/peer_methods.py --check`` compares every peer with real leave-one-out retraining on a toy.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO_ROOT / ".cache" / "peers"

# TRAK/dattri projection size: what their docs use for small models, capped by the parameter count.
TRAK_PROJ_DIM = 512
# dattri IF-Arnoldi: proj_dim 100 (its default) gave NaN on the benchmark MLP; 50 worked.
ARNOLDI_PROJ_DIM = 50
# dattri vmaps the iHVP over every test gradient of a batch at once; targets go in batches of this many (memory).
DATTRI_TEST_BATCH = 50
DATTRI_FEATURE_BATCH = 100  # training samples per batch of TRAK's per-sample gradients: memory only
# dattri IF-CG's autodiff mode: its docstring's "memory-efficient" choice. With its default "rev-rev" IF-CG on
# the MNIST MLP (805k parameters) ran out of 24 GiB at n = 200 and 1,000; with "rev-fwd" it peaked at 13 GiB at
# both. LiSSA keeps "rev-rev": dattri 0.3.0's "rev-fwd" HVP fails on LiSSA's sampled (params, data) tuple.
DATTRI_CG_MODE = "rev-fwd"
# LiSSA: its recursion v <- g + (1 - damping) v - H_b v / scaling, H_b the Hessian of one sampled training
# sample, converges when scaling exceeds H_b's largest eigenvalue; scaling = this many times the largest
# per-sample Gauss-Newton eigenvalue ||grad f(x_i)||^2 at the trained weights.
LISSA_SCALING_MARGIN = 2.0
LISSA_DEPTH = 5000  # dattri's default recursion_depth
# LiSSA runs only when a timed probe of LISSA_PROBE_DEPTH recursions (fixed costs included, so an upper bound)
# extrapolates to at most this many seconds for LISSA_DEPTH; otherwise it fails with the estimate. Measured on
# the MNIST MLP (n = 1,000, 392 targets, machine shared): 20 recursions 568 s, i.e. about 39 hours for 5,000.
LISSA_BUDGET_S = 3600.0
LISSA_PROBE_DEPTH = 3


@dataclass
class PeerResult:
    tau: np.ndarray  # (n, n_val) float64, convention above
    seconds: float  # wall time of the peer's own work (fitting factors + scoring), not of imports
    settings: str  # one line: the settings used and why (as the peer's docs recommend)


def add_peers_to_path() -> None:
    """Append ``.cache/peers`` to the END of sys.path, so that the venv's torch/numpy win over any copy there."""
    path = str(PEERS_DIR)
    if path not in sys.path:
        sys.path.append(path)


# --------------------------------------------------------------------------------------------------------------
# shared helpers


def _with_params(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with its named parameters replaced by ``params``."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(params[name].to(p.dtype))
    net.eval()
    return net


def _state_dict(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state_dict of ``model`` (buffers included) with the parameters taken from ``params``."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in params.items():
        state[name] = p.detach().clone()
    return state


def _damping(lr: float, steps: int, weight_decay: float) -> float:
    """Damping for the inverse-Hessian peers: 1/(lr*steps) (a GD run of lr*steps 'time' only resolves curvature
    above that) plus the weight decay, which is part of the Hessian of the training objective."""
    return 1.0 / (lr * steps) + weight_decay


def _as_tau(scores: torch.Tensor | np.ndarray, n: int, n_val: int, sign: float) -> np.ndarray:
    tau = sign * np.asarray(scores, dtype=np.float64)
    if tau.shape != (n, n_val):
        raise ValueError(f"peer returned shape {tau.shape}, expected {(n, n_val)}")
    if not np.all(np.isfinite(tau)):
        raise FloatingPointError("peer returned non-finite scores")
    return tau


def _quiet() -> None:
    for name in ("kronfluence", "TRAK", "GradientComputer", "ScoreComputer", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="dattri")
    warnings.filterwarnings("ignore", module="kronfluence")
    warnings.filterwarnings("ignore", module="trak")
    warnings.filterwarnings("ignore", category=FutureWarning)


# --------------------------------------------------------------------------------------------------------------
# Kronfluence


def _kronfluence(strategy, model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay) -> PeerResult:
    add_peers_to_path()
    _quiet()
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class OutputTask(Task):
        """Train loss: sum over the batch of 0.5*(f-y)^2 (Kronfluence wants sums; its covariances are then
        averaged over examples, i.e. a Gauss-Newton/Fisher of the MEAN loss).  With ``sample=True`` the target is
        drawn from the model's Gaussian predictive N(f, 1), giving the true Fisher (= GGN of the squared loss).
        Measurement: the sum of raw outputs of the query batch, so its per-query gradient is grad f(x_j)."""

        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            out = model(inputs)
            if sample:
                with torch.no_grad():
                    targets = out + torch.randn_like(out)
            return 0.5 * ((out - targets) ** 2).sum()

        def compute_measurement(self, batch, model):
            inputs, _ = batch
            return model(inputs).sum()

    torch.manual_seed(0)
    task = OutputTask()
    net = prepare_model(_with_params(model, trained), task)
    train_set = torch.utils.data.TensorDataset(x, y)
    query_set = torch.utils.data.TensorDataset(x_val, torch.zeros(len(x_val), 1, dtype=x_val.dtype))
    damping = _damping(lr, steps, weight_decay)
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        analyzer = Analyzer(analysis_name="peer", model=net, task=task, cpu=True, disable_tqdm=True, output_dir=out_dir)
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=train_set,
            per_device_batch_size=min(len(x), 256),
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name=strategy,
            query_dataset=query_set,
            train_dataset=train_set,
            per_device_query_batch_size=min(len(x_val), 256),
            per_device_train_batch_size=min(len(x), 256),
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]  # (n_val, n)
        seconds = time.perf_counter() - t0
    tau = _as_tau(scores.T.numpy(), len(x), len(x_val), sign=-1.0)
    settings = (
        f"strategy={strategy}, true Fisher (targets sampled from N(f,1)), damping_factor=1/(lr*steps)+wd={damping:.3g} "
        "(default 1e-8 was poor), trained weights only, measurement=f(x_j), train loss=sum 0.5(f-y)^2"
    )
    return PeerResult(tau=tau, seconds=seconds, settings=settings)


def kronfluence_ekfac(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """Kronfluence EK-FAC influence at the trained weights: score[j, i] = grad f(x_j)^T (G + damping)^-1 grad l_i,
    G the eigenvalue-corrected Kronecker-factored Fisher of the mean loss.  Up-weighting sample i by eps moves
    the weights by -eps H^-1 grad l_i, so removing it (eps = -1/n) changes f(x_j) by +score/n:
    f_{-i} - f = score/n, hence tau[i, j] = -score[j, i] (transposed, sign flipped)."""
    return _kronfluence("ekfac", model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay)


def kronfluence_kfac(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """Kronfluence K-FAC influence (Kronecker-factored Fisher, no eigenvalue correction); same score and the same
    conversion as ``kronfluence_ekfac``: tau[i, j] = -score[j, i]."""
    return _kronfluence("kfac", model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay)


# --------------------------------------------------------------------------------------------------------------
# TRAK (traker package)


def trak(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """TRAK (MadryLab ``traker``) with the checkpoints as the ensemble.  Model output function = the raw output
    f(x) (train features and target gradients alike), out-to-loss term Q_i = -d l_i / d f = y_i - f(x_i) (TRAK's
    Q is 1-p = -dloss/dmargin for classification).  score[i, j] = mean_k phi_i^T (Phi^T Phi)^-1 phi_j * mean_k Q_i
    with phi the projected output gradients: TRAK's estimate of how much including sample i raises the target
    output (for least squares it is the exact leave-one-out formula up to leverage), so tau[i, j] = score[i, j]."""
    add_peers_to_path()
    _quiet()
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput

    class RawOutput(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, inp, target):
            return torch.func.functional_call(model, (weights, buffers), (inp.unsqueeze(0),)).sum()

        @staticmethod
        def get_out_to_loss_grad(model, weights, buffers, batch):
            inp, target = batch
            out = torch.func.functional_call(model, (weights, buffers), (inp,))
            return (target - out).reshape(-1, 1).detach()

    n_params = sum(p.numel() for p in model.parameters())
    proj_dim = min(TRAK_PROJ_DIM, n_params)
    # Phi^T Phi is proj_dim x proj_dim of rank <= n: with n < proj_dim it is singular and TRAK's plain inverse
    # blows up, so the documented ridge knob lambda_reg is set then (relative to the mean feature energy).
    net = _with_params(model, trained)
    y_val = torch.zeros(len(x_val), 1, dtype=x_val.dtype)
    with tempfile.TemporaryDirectory() as save_dir:
        t0 = time.perf_counter()
        lambda_reg = 0.0
        if len(x) <= proj_dim:
            lambda_reg = _trak_ridge(net, RawOutput(), checkpoints, x, y, proj_dim)
        traker = TRAKer(
            model=net,
            task=RawOutput(),
            train_set_size=len(x),
            save_dir=save_dir,
            device="cpu",
            proj_dim=proj_dim,
            use_half_precision=False,
            lambda_reg=lambda_reg,
            logging_level=logging.ERROR,
        )
        for k, ckpt in enumerate(checkpoints):
            traker.load_checkpoint(_state_dict(net, ckpt), model_id=k)
            for s in range(0, len(x), 256):
                traker.featurize(batch=(x[s : s + 256], y[s : s + 256]), num_samples=len(x[s : s + 256]))
        traker.finalize_features()
        for k, ckpt in enumerate(checkpoints):
            traker.start_scoring_checkpoint(
                exp_name="val", checkpoint=_state_dict(net, ckpt), model_id=k, num_targets=len(x_val)
            )
            for s in range(0, len(x_val), 256):
                traker.score(batch=(x_val[s : s + 256], y_val[s : s + 256]), num_samples=len(x_val[s : s + 256]))
        scores = np.array(traker.finalize_scores(exp_name="val"))  # (n, n_val)
        seconds = time.perf_counter() - t0
    tau = _as_tau(scores, len(x), len(x_val), sign=1.0)
    settings = (
        f"BasicProjector (CPU, normal), proj_dim={proj_dim} (min(512, #params)), ensemble={len(checkpoints)} "
        f"checkpoints, float32, output fn=f(x), Q=y-f, lambda_reg={lambda_reg:.3g}"
        + (" (n<=proj_dim: Phi^T Phi singular, ridge = 1e-3*trace/proj_dim)" if lambda_reg else "")
    )
    return PeerResult(tau=tau, seconds=seconds, settings=settings)


def _trak_ridge(net, task, checkpoints, x, y, proj_dim) -> float:
    """1e-3 * trace(Phi^T Phi)/proj_dim in TRAK's own feature scale (projected gradients / sqrt(#params)); the
    expected trace of a Gaussian JL projection preserves squared norms times proj_dim, so this needs no projection."""
    n_params = sum(p.numel() for p in net.parameters())
    m = _with_params(net, checkpoints[-1])
    weights, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    grad = torch.func.vmap(torch.func.grad(task.get_output, argnums=1), in_dims=(None, None, None, 0, 0))
    g = grad(m, weights, buffers, x, y)
    sq = sum(v.reshape(len(x), -1).pow(2).sum() for v in g.values()) / n_params
    return float(1e-3 * sq * proj_dim / proj_dim)


# --------------------------------------------------------------------------------------------------------------
# dattri


def _dattri_task(model, trained, checkpoints, use_checkpoints: bool, sample_ndim: int, train_fn: str = "loss"):
    """dattri AttributionTask: target = raw output f(x_j); loss = mean over the given batch of 0.5*(f-y)^2 (so the
    Hessian of the full-batch loss is the Hessian of the training objective without weight decay).  For TRAK the
    'loss' slot holds the model output function f(x) instead, as dattri's TRAK docs do with the margin.
    `sample_ndim`: the dimensions of one input; TracIn and TRAK vmap over single samples, which get a batch of one
    (a CNN's flatten needs the batch dimension)."""
    from dattri.task import AttributionTask

    net = _with_params(model, trained)

    def _out(params, inp):
        if inp.ndim == sample_ndim:
            return torch.func.functional_call(net, params, (inp.unsqueeze(0),))[0]
        return torch.func.functional_call(net, params, (inp,))

    def loss_func(params, data):
        inp, target = data
        return (0.5 * (_out(params, inp) - target) ** 2).mean()

    def output_func(params, data):
        inp, _ = data
        return _out(params, inp).sum()

    def load(m, ckpt):
        m.load_state_dict(ckpt)
        m.eval()
        return m

    ckpts = [_state_dict(net, c) for c in (checkpoints if use_checkpoints else [trained])]
    task = AttributionTask(
        loss_func=loss_func if train_fn == "loss" else output_func,
        model=net,
        checkpoints=ckpts,
        target_func=output_func,
        checkpoints_load_func=load,
    )
    return task, net


def _loaders(x, y, x_val, test_batch: int = DATTRI_TEST_BATCH, train_batch: int | None = None):
    """One full training batch by default: dattri's CG/LiSSA sum the iHVP over the batches of the full loader and
    recompute the test transform for every train batch, so one batch is both the exact Hessian and the cheapest.
    TRAK's per-sample features do not depend on the batching: `train_batch` bounds its memory (a full batch of the
    MLP's 1,000 gradients was killed at 18 GiB). Not for TracIn: it recomputes the target gradients for every
    training batch (its measured seconds are with one). Targets go in batches of `test_batch`."""
    from torch.utils.data import DataLoader, TensorDataset

    train = DataLoader(TensorDataset(x, y), batch_size=train_batch or len(x), shuffle=False)
    val = DataLoader(TensorDataset(x_val, torch.zeros(len(x_val), 1, dtype=x_val.dtype)), batch_size=test_batch)
    return train, val


def _dattri_if(kind, model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay) -> PeerResult:
    add_peers_to_path()
    _quiet()
    from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG, IFAttributorLiSSA

    task, _ = _dattri_task(model, trained, checkpoints, False, x.ndim - 1)
    # LiSSA's cost is its recursion_depth sequential steps per target batch, each a one-sample HVP vmapped over
    # the batch: all targets in one batch pay those steps once
    train_loader, val_loader = _loaders(x, y, x_val, len(x_val) if kind == "lissa" else DATTRI_TEST_BATCH)
    damping = _damping(lr, steps, weight_decay)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if kind == "cg":
        attributor = IFAttributorCG(task=task, device="cpu", regularization=damping, mode=DATTRI_CG_MODE)
        settings = f"CG max_iter=10 (default), mode={DATTRI_CG_MODE}, regularization=1/(lr*steps)+wd={damping:.3g}"
    elif kind == "arnoldi":
        attributor = IFAttributorArnoldi(
            task=task, device="cpu", proj_dim=ARNOLDI_PROJ_DIM, max_iter=100, regularization=damping
        )
        settings = (
            f"Arnoldi proj_dim={ARNOLDI_PROJ_DIM} (default 100 gave NaN on the MLP), max_iter=100, "
            f"regularization=1/(lr*steps)+wd={damping:.3g}"
        )
    elif kind == "lissa":
        # the fixed point of the recursion is (H + damping*scaling)^-1 g: damping = regularization / scaling
        scaling = LISSA_SCALING_MARGIN * _largest_gauss_newton(model, trained, x)

        def lissa(depth: int):
            kwargs = {"damping": damping / scaling, "scaling": scaling, "recursion_depth": depth}
            return IFAttributorLiSSA(task=task, device="cpu", **kwargs)

        probe = lissa(LISSA_PROBE_DEPTH)
        probe.cache(train_loader)
        with torch.no_grad():
            probe.attribute(train_loader, val_loader)
        estimate = (time.perf_counter() - t0) * LISSA_DEPTH / LISSA_PROBE_DEPTH
        if estimate > LISSA_BUDGET_S:
            raise RuntimeError(
                f"not run: {LISSA_PROBE_DEPTH} recursions took {time.perf_counter() - t0:.0f} s, so its "
                f"{LISSA_DEPTH} would take about {estimate / 3600:.1f} h (budget {LISSA_BUDGET_S / 3600:g} h)"
            )
        attributor = lissa(LISSA_DEPTH)
        settings = (
            f"LiSSA batch_size=1, recursion_depth={LISSA_DEPTH}, mode=rev-rev (defaults), "
            f"scaling={scaling:.3g} ({LISSA_SCALING_MARGIN:g} x max_i ||grad f(x_i)||^2 instead of its default 50, "
            "which does not follow the network's curvature), damping=regularization/scaling, "
            f"regularization=1/(lr*steps)+wd={damping:.3g}; its seconds include the {LISSA_PROBE_DEPTH}-recursion probe"
        )
    else:
        raise ValueError(kind)
    attributor.cache(train_loader)
    # dattri's derivatives are torch.func transforms, which ignore an outer no_grad; without it the flattened
    # parameters carry autograd history and LiSSA's recursion keeps every step alive (measured: 2 GiB after
    # 250 steps on --check's toy, past 23 GiB before 5000)
    with torch.no_grad():
        scores = attributor.attribute(train_loader, val_loader)  # (n, n_val) = grad l_i^T H^-1 grad f_j
    seconds = time.perf_counter() - t0
    tau = _as_tau(scores.detach().cpu().numpy(), len(x), len(x_val), sign=-1.0)
    return PeerResult(tau=tau, seconds=seconds, settings=settings + "; trained weights only; target=f(x_j)")


def _largest_gauss_newton(model, trained, x) -> float:
    """max_i ||grad_w f(x_i)||^2 at the trained weights: the largest eigenvalue of sample i's Gauss-Newton Hessian
    of 0.5*(f-y)^2, the curvature LiSSA's one-sample recursion must stay below."""
    net = _with_params(model, trained)
    weights, buffers = dict(net.named_parameters()), dict(net.named_buffers())

    def output(w, inp):
        return torch.func.functional_call(net, (w, buffers), (inp.unsqueeze(0),)).sum()

    largest = 0.0
    for s in range(0, len(x), 64):
        g = torch.func.vmap(torch.func.grad(output), in_dims=(None, 0))(weights, x[s : s + 64])
        norms = sum(v.detach().reshape(len(v), -1).pow(2).sum(1) for v in g.values())
        largest = max(largest, float(norms.max()))
    return largest


def dattri_if_cg(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """dattri influence function, inverse-Hessian-vector product by conjugate gradient on the exact Hessian of the
    mean training loss at the trained weights: score[i, j] = grad l_i^T (H + reg)^-1 grad f(x_j).  Removing sample i
    changes f(x_j) by +score/n, so tau[i, j] = -score[i, j]."""
    return _dattri_if("cg", model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay)


def dattri_if_arnoldi(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """dattri influence function with the Arnoldi (top-eigenspace) approximation of H^-1 of the mean training loss
    at the trained weights; score[i, j] = grad l_i^T V (Lambda + reg)^-1 V^T grad f(x_j); tau[i, j] = -score[i, j]."""
    return _dattri_if("arnoldi", model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay)


def dattri_if_lissa(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """dattri influence function with the LiSSA stochastic Neumann-series inverse of the Hessian of the mean
    training loss at the trained weights; score[i, j] = grad l_i^T H^-1 grad f(x_j); tau[i, j] = -score[i, j]."""
    return _dattri_if("lissa", model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay)


def dattri_tracin(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """dattri TracIn(CP): score[i, j] = sum_k eta_k grad l_i(w_k)^T grad f(x_j; w_k) over the checkpoints, eta_k = lr
    times the steps each checkpoint stands for (lr*steps/K, evenly spaced), gradients JL-projected to 512 dims (its
    default).  A GD step on the mean loss moves f(x_j) by -(lr/n) grad f^T grad l_i because of sample i, so
    tau[i, j] = -score[i, j]."""
    add_peers_to_path()
    _quiet()
    from dattri.algorithm.tracin import TracInAttributor

    task, _ = _dattri_task(model, trained, checkpoints, True, x.ndim - 1)
    train_loader, val_loader = _loaders(x, y, x_val)
    n_params = sum(p.numel() for p in model.parameters())
    proj = {"proj_dim": min(TRAK_PROJ_DIM, n_params), "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
    weights = torch.full((len(checkpoints),), lr * steps / len(checkpoints))
    t0 = time.perf_counter()
    attributor = TracInAttributor(
        task=task, weight_list=weights, normalized_grad=False, projector_kwargs=proj, device="cpu"
    )
    scores = attributor.attribute(train_loader, val_loader)
    seconds = time.perf_counter() - t0
    tau = _as_tau(scores.detach().cpu().numpy(), len(x), len(x_val), sign=-1.0)
    settings = (
        f"TracInCP over {len(checkpoints)} checkpoints, weight lr*steps/K={weights[0]:.3g} each, "
        f"normalized_grad=False, proj_dim={proj['proj_dim']} (default 512)"
    )
    return PeerResult(tau=tau, seconds=seconds, settings=settings)


def dattri_trak(model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay=0.0) -> PeerResult:
    """dattri TRAK with the checkpoints as the ensemble: train features = projected gradients of the model output
    f(x_i) (dattri's TRAK takes the output function in the loss slot), Q_i = 1 - correct_probability = y_i - f(x_i)
    (= -d l_i/d f), score[i, j] = mean_k phi_i^T (Phi^T Phi + reg)^-1 phi_j * mean_k Q_i: including sample i raises
    f(x_j) by it, so tau[i, j] = score[i, j]."""
    add_peers_to_path()
    _quiet()
    from dattri.algorithm.trak import TRAKAttributor

    task, net = _dattri_task(model, trained, checkpoints, True, x.ndim - 1, train_fn="output")

    def one_minus_q(params, data):
        inp, target = data
        out = torch.func.functional_call(net, params, (inp.unsqueeze(0),)).reshape(-1)
        return 1.0 - (target.reshape(-1) - out)

    train_loader, val_loader = _loaders(x, y, x_val, train_batch=DATTRI_FEATURE_BATCH)
    n_params = sum(p.numel() for p in model.parameters())
    proj_dim = min(TRAK_PROJ_DIM, n_params)
    proj = {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
    t0 = time.perf_counter()
    reg = 0.0
    if len(x) <= proj_dim:
        reg = _dattri_trak_ridge(task, x, y, proj_dim)
    attributor = TRAKAttributor(
        task=task, correct_probability_func=one_minus_q, projector_kwargs=proj, device="cpu", regularization=reg
    )
    attributor.cache(train_loader)
    scores = attributor.attribute(val_loader)  # (n, n_val)
    seconds = time.perf_counter() - t0
    tau = _as_tau(scores.detach().cpu().numpy(), len(x), len(x_val), sign=1.0)
    settings = (
        f"proj_dim={proj_dim} (min(512 default, #params)), ensemble={len(checkpoints)} checkpoints, "
        f"output fn=f(x), Q=y-f, regularization={reg:.3g}"
        + (" (n<=proj_dim: Phi^T Phi singular, ridge = 1e-3*trace/proj_dim)" if reg else "")
    )
    return PeerResult(tau=tau, seconds=seconds, settings=settings)


def _dattri_trak_ridge(task, x, y, proj_dim) -> float:
    """1e-3 * trace(Phi^T Phi)/proj_dim in dattri's TRAK feature scale (gradients / sqrt(#params))."""
    params, _ = task.get_param(ckpt_idx=len(task.get_checkpoints()) - 1)
    g = task.get_grad_loss_func(in_dims=(None, 0))(params, (x, y))
    sq = g.pow(2).sum() / g.shape[1]
    return float(1e-3 * sq * proj_dim / proj_dim)


PEERS: dict[str, Callable[..., PeerResult]] = {
    "kronfluence_ekfac": kronfluence_ekfac,
    "kronfluence_kfac": kronfluence_kfac,
    "trak": trak,
    "dattri_if_cg": dattri_if_cg,
    "dattri_if_arnoldi": dattri_if_arnoldi,
    "dattri_if_lissa": dattri_if_lissa,
    "dattri_tracin": dattri_tracin,
    "dattri_trak": dattri_trak,
}


def run_peer(
    name: str,
    model: torch.nn.Module,
    trained: dict[str, torch.Tensor],
    checkpoints: list[dict[str, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
) -> PeerResult:
    """Run peer ``name`` (a key of PEERS) and return its tau[i, j] ~ f(x_j) - f_{-i}(x_j), shape (n, n_val)."""
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; known: {sorted(PEERS)}")
    x, y, x_val = x.detach().float(), y.detach().float().reshape(len(x), 1), x_val.detach().float()
    return PEERS[name](model, trained, checkpoints, x, y, x_val, lr, steps, weight_decay)


# --------------------------------------------------------------------------------------------------------------
# --check: a toy with real leave-one-out retraining


def _gd(model, x, y, lr, steps, n_ckpt=4):
    """Full-batch GD on mean 0.5*(f-y)^2 from the model's weights; returns the checkpoints (last = trained)."""
    net = copy.deepcopy(model)
    params = list(net.parameters())
    ckpts = []
    for t in range(steps):
        loss = 0.5 * ((net(x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
        if (t + 1) % max(1, steps // n_ckpt) == 0 or t + 1 == steps:
            ckpts.append({k: v.detach().clone() for k, v in net.named_parameters()})
    return ckpts[-n_ckpt:], net


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare every peer with real leave-one-out retraining")
    parser.add_argument("--peers", nargs="*", default=None, help="subset of PEERS to check")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars would drown the table
    if not args.check:
        parser.print_help()
        return 0
    from scipy.stats import pearsonr, spearmanr
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, [4, 9])
    data, label = digits.data[keep] / 16.0, digits.target[keep]
    x = torch.tensor(data[:100], dtype=torch.float32)
    y = torch.tensor((label[:100] == 9)[:, None], dtype=torch.float32)
    x_val = torch.tensor(data[100:140], dtype=torch.float32)
    lr, steps = 0.05, 200
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1))
    checkpoints, net = _gd(model, x, y, lr, steps)
    trained = checkpoints[-1]
    with torch.no_grad():
        f_val = net(x_val)[:, 0]
    removed = np.sort(np.random.default_rng(0).choice(len(x), size=20, replace=False))
    real = np.zeros((len(removed), len(x_val)))
    for r, i in enumerate(removed):
        mask = torch.ones(len(x), dtype=torch.bool)
        mask[i] = False
        _, net_i = _gd(model, x[mask], y[mask], lr, steps)
        with torch.no_grad():
            real[r] = (f_val - net_i(x_val)[:, 0]).numpy()
    real_fsi = (real**2).sum(axis=1)
    print(f"toy: digits 4 vs 9, n={len(x)}, n_val={len(x_val)}, lr={lr}, steps={steps}, {len(removed)} LOO retrains")
    print(f"{'peer':<20} {'pearson_tau':>12} {'spearman_fsi':>13} {'seconds':>8}  settings")
    ok = True
    for name in args.peers or list(PEERS):
        try:
            res = run_peer(name, model, trained, checkpoints, x, y, x_val, lr, steps)
        except Exception as exc:  # noqa: BLE001 - report every peer, keep going
            print(f"{name:<20} FAILED: {type(exc).__name__}: {exc}")
            ok = False
            continue
        tau = res.tau[removed]
        pear = pearsonr(tau.ravel(), real.ravel())[0]
        spear = spearmanr((tau**2).sum(axis=1), real_fsi)[0]
        ok &= bool(pear > 0)
        print(f"{name:<20} {pear:>12.3f} {spear:>13.3f} {res.seconds:>8.2f}  {res.settings}")
    print("all peers have a positive Pearson of tau" if ok else "SOME PEER FAILED OR HAS A NON-POSITIVE PEARSON")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
