"""The attribute stage's effects against really retraining the network without each of m training samples.

    python bench/attribution_fidelity.py [--classes 2 4] [--n 400] [--samples 16] [--targets 200]
                                         [--lr 0.002] [--t 1000]

Fashion-MNIST (the Debian package's IDX files), two classes, pixels standardized ((x − 0.286)/0.353),
MLP 784-1024-1 (init seed 0, float32), full-batch GD on the mean loss, no weight decay. The real
network is trained on all n samples and without each of --samples seeded ones, all runs stepped
together. Truth: f(x_t) − f₋ᵢ(x_t) of the real runs on each of --targets validation images. Estimate:
`sui_core.studies.attribution` with the exact kernel (A[i, t] = W_t Δc_i). Printed: Pearson and Spearman
over all (sample, target) pairs, the median over pairs of estimate/real among the pairs whose real
change is in the top half by size (the sign-stable ones), the share of those with the same sign, and
per target the Spearman over the m samples (median over targets).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from sui_core.config import DataConfig, JacobianConfig, ModelConfig
from sui_core.data.splits import load_source
from sui_core.linearized.estimate import linearize
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.network.outputs import targets
from sui_core.network.training import predict, train_full_batch
from sui_core.studies.attribution import attribute

STANDARDIZE = {"mean": [0.286], "std": [0.353]}  # Fashion-MNIST's pixel mean and std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--t", type=int, default=1000)
    args = parser.parse_args()
    data = DataConfig(
        source="fashion_mnist", classes=args.classes, label_noise=0.0, max_train=args.n, normalize=STANDARDIZE
    )
    raw = load_source(data)
    train, val = raw.train, raw.val
    x, x_val = torch.as_tensor(train.x), torch.as_tensor(val.x[: args.targets])
    y = targets(train.label, train.num_classes)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mlp", hidden=[1024]), train.input_shape, 1).float()
    started = time.perf_counter()
    lin = linearize(model, x, x_val, JacobianConfig(projection="exact"))
    basis = lin.basis()
    with torch.no_grad():
        f0_val = model(x_val).double().numpy()
    effects = []
    found = attribute(
        basis,
        y - lin.f0,
        f0_val,
        basis.val_rows,
        Recipe(args.lr, 0.0, args.t, "discrete"),
        1,
        on_block=lambda start, a: effects.append(a),
    )
    estimate = np.concatenate(effects)[:, :, 0]  # (n, m)
    sui_s = time.perf_counter() - started
    left = np.sort(np.random.default_rng(0).choice(len(train), args.samples, replace=False))
    weights = torch.ones(1 + len(left), len(train))
    weights[1 + np.arange(len(left)), left] = 0.0
    started = time.perf_counter()
    params = train_full_batch(model, x, torch.as_tensor(y), weights, args.lr, args.t, progress="real runs")
    out = predict(model, params, x_val).double().numpy()[:, :, 0]  # (1 + m, targets)
    real_s = time.perf_counter() - started
    real = out[0][None, :] - out[1:]  # (m, targets)
    est = estimate[left]
    big = np.abs(real) >= np.median(np.abs(real))
    per_target = [spearmanr(est[:, j], real[:, j])[0] for j in range(real.shape[1])]
    print(
        f"Fashion-MNIST {args.classes}, n {len(train)}, {args.samples} samples × {real.shape[1]} targets, "
        f"lr {args.lr}, t {args.t} (lr·t {args.lr * args.t:g}); train MSE of the real run "
        f"{0.5 * np.mean((predict(model, params, x)[0].double().numpy() - y) ** 2):.4f}"
    )
    print(
        f"all pairs: Pearson {pearsonr(est.ravel(), real.ravel())[0]:.3f}, Spearman "
        f"{spearmanr(est.ravel(), real.ravel())[0]:.3f}; larger half: median estimate/real "
        f"{np.median(est[big] / real[big]):.3f}, same sign {np.mean(np.sign(est[big]) == np.sign(real[big])):.3f}; "
        f"per target Spearman over the samples: median {np.median(per_target):.3f}"
    )
    print(
        f"seconds: sui (kernel, basis, all {len(train)} × {real.shape[1]} effects) {sui_s:.1f}, real runs {real_s:.1f}"
    )
    print(f"median additivity (Σ single effects / all removed): {np.nanmedian(found.additivity):.4f}")


if __name__ == "__main__":
    main()
