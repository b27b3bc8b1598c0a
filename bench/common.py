"""Helpers shared by the benchmarks in this folder (imported as `common`: run the scripts as
`python bench/<name>.py`, which puts this folder on sys.path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

# One batch of per-sample Jacobians: the pipeline's default (jacobian.batch_size).
JACOBIAN_BATCH = 64


def add_recipe_args(parser) -> None:
    """The training recipe and solver options both benchmarks share (defaults: the pipeline's)."""
    from sui_core.config import LooConfig

    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--t", type=float, default=2000)
    parser.add_argument("--dynamics", choices=("discrete", "continuous"), default="discrete")
    parser.add_argument("--block-size", type=int, default=LooConfig().block_size)
    parser.add_argument("--tol", type=float, default=LooConfig().tol, help="loo.tol (default: the pipeline's)")


def environment_lines() -> list[str]:
    """Python, numpy, CPUs, load, OPENBLAS_CORETYPE and the BLAS that threadpoolctl sees."""
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}{load}",
        f"OPENBLAS_CORETYPE = {os.environ.get('OPENBLAS_CORETYPE', '(unset)')}  "
        "(may be set in this environment; it pins OpenBLAS kernels and changes speed)",
    ]
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            if pool.get("user_api") == "blas":
                lines.append(
                    f"BLAS: {pool.get('internal_api')} {pool.get('version')} arch={pool.get('architecture')} "
                    f"threads={pool.get('num_threads')} ({Path(pool.get('filepath', '')).name})"
                )
    except ImportError:
        lines.append("BLAS: threadpoolctl not installed")
    return lines


def dims_per_tensor_for(dim: int, numels: list[int]) -> int:
    """The smallest p with Σ min(p, numel) ≥ dim (or all coordinates if dim exceeds them)."""
    lo, hi = 1, max(numels)
    if sum(numels) <= dim:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(min(mid, m) for m in numels) >= dim:
            hi = mid
        else:
            lo = mid + 1
    return lo


def stable_lr(lr: float, weight_decay: float, dynamics: str, s_max: float, n: int) -> tuple[float, str]:
    """`lr`, halved until discrete GD is stable on n and n − 1 samples (η·h_max < 1.9, with margin).

    s_max is the largest eigenvalue of ΦᵀΦ; η = lr/(n − 1) on the left-out problems is the binding one.
    Returns the lr to use and a note saying so when it was lowered (empty otherwise)."""
    used = lr
    if dynamics == "discrete":
        while (used / (n - 1)) * (s_max + (n - 1) * weight_decay) >= 1.9:
            used /= 2
    note = f"lr {lr:g} diverges (lr·h_max/(n−1) ≥ 1.9); used lr = {used:g}" if used != lr else ""
    return used, note


def max_rel(a, b) -> float:
    """max |a − b| / |b| elementwise."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def jacobian_model(arch: str, dim: int, seed: int, input_shape=(1, 28, 28), hidden=1024):
    """A k = 1 network of `arch` at its seeded init and a `coordinates` projector with p per tensor
    chosen so that D = Σ min(p, numel) is the smallest ≥ dim. Returns (model, projector, p)."""
    from sui_core.config import JacobianConfig, ModelConfig
    from sui_core.linearized.jacobians import make_projector
    from sui_core.network.models import build_model

    cfg = (
        ModelConfig(arch=arch, hidden=[hidden], init_seed=seed)
        if arch == "mlp"
        else ModelConfig(arch=arch, init_seed=seed)
    )
    model = build_model(cfg, list(input_shape), 1)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    per_tensor = dims_per_tensor_for(dim, [s.numel() for s in shapes.values()])
    projector = make_projector(JacobianConfig(projection="coordinates", dims_per_tensor=per_tensor, seed=seed), shapes)
    return model, projector, per_tensor


def jacobians(
    model, projector, x: np.ndarray, out: np.ndarray | None = None, batch: int = JACOBIAN_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """f0 (n, k) float64 and projected Jacobians Φ (n, k, D) float32 of images x (n, C, H, W).

    With `out` (e.g. an np.memmap of shape (n, k, D)) Φ is written into it batch by batch, so that it
    is never held twice; it is also what is returned."""
    import torch

    from sui_core.linearized.jacobians import per_sample_jacobians

    f0s = []
    phis = [] if out is None else None
    for lo in range(0, len(x), batch):
        xb = torch.as_tensor(np.ascontiguousarray(x[lo : lo + batch], dtype=np.float32))
        with torch.no_grad():
            f0, jac = per_sample_jacobians(model, xb)
        phi = projector.project(jac).to(torch.float32).numpy()
        if out is None:
            phis.append(phi)
        else:
            out[lo : lo + len(phi)] = phi
        f0s.append(f0.to(torch.float64).numpy())
    return np.concatenate(f0s), (np.concatenate(phis) if out is None else out)
