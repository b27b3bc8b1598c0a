"""The linear datamodeling score (LDS) of sui against the real network retrained on random subsets.

    python bench/lds.py --t 200                       # MNIST 4 vs 9, n = 1,000, lr 1e-3: lr·t = 0.2
    python bench/lds.py --lr 2e-3 --t 1000            # lr·t = 2

Data and network as bench/fidelity.py (real MNIST 4 vs 9, the first `--n` training samples, pixels
standardized, MLP 784-1024-1 from init seed 0, float32, full-batch gradient descent on the mean loss).
`--subsets` seeded subsets each keep `--fraction` of the training samples; the real network is trained
on each (the truth), and the network linearized at w0 (exact kernel) predicts every validation output
by exact group removal (`group`, what the validate stage reports as lds_group) and by the sum of
single-sample effects (`additive`). LDS = mean over the validation targets of the Spearman correlation
across subsets (sui_core.studies.datamodels). Prints one table with the seconds of each part.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from fidelity import load

from sui_core.config import JacobianConfig
from sui_core.linearized.estimate import linearize
from sui_core.linearized.solver import Recipe
from sui_core.studies.datamodels import datamodel_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--t", type=int, default=2000)
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, x, y, x_val = load(args.n)
    recipe = Recipe(args.lr, args.wd, args.t, "discrete")
    started = time.perf_counter()
    linearization = linearize(model, x, x_val, JacobianConfig(projection="exact"))
    est = linearization.estimate(y, recipe)
    linearize_seconds = time.perf_counter() - started
    score = datamodel_score(
        model, x, y, x_val, None, est.basis, y - linearization.f0, recipe, args.subsets, args.fraction, args.seed, True
    )
    print(
        f"n = {len(x)}, {len(x_val)} targets ({score.targets} vary), {args.subsets} subsets keeping "
        f"{int(score.kept[0].sum())}; lr·t = {args.lr * args.t:g}; linearize + loo {linearize_seconds:.1f} s, "
        f"real retraining {score.seconds['retraining']:.0f} s"
    )
    print("| prediction | LDS | median per-target Spearman | seconds |\n|---|---|---|---|")
    for name in score.predicted:
        per_target = score.per_target(name)
        print(
            f"| {name} | {score.lds(name):.3f} | {np.nanmedian(per_target):.3f} | "
            f"{score.seconds[name]:.1f} (+ {linearize_seconds:.1f} shared) |"
        )


if __name__ == "__main__":
    main()
