"""The attribute stage's cost beyond the loo stage: the train × target effect matrix at scale.

    python bench/attribution.py [--n 10000] [--targets 1000] [--rank 4096] [--k 1] [--t 2000]

One basis (seeded synthetic eigenvalues and training rows Z, n × k × r, the shapes of an MLP projected
to D = r; the cost does not depend on the values), a residual and m target rows W. Times in the same
run, each the best of --repeat:

- loo       `loo_quadratic_forms`, what the loo stage computes (every form, SGD covariance included);
- attribute `sui_core.studies.attribution.attribute`: the same leave-one-out solve, then the effects on
            every target (one product per block), top proponents and opponents, the whole matrix kept
            (as the stage does when it fits);

and prints both and their difference, the target's "beyond the loo stage" (issue: ≤ 2 minutes at
n = 10,000, 1,000 targets).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sui_core.linearized.ntk import Basis
from sui_core.linearized.scores import loo_quadratic_forms
from sui_core.linearized.solver import Recipe
from sui_core.studies.attribution import attribute


def synthetic(n: int, k: int, r: int, m: int, seed: int = 0) -> tuple[Basis, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.sort(rng.gamma(0.5, 1.0, r))[::-1] * n / r + 1e-3  # a decaying spectrum, mean-loss top ~ O(1)
    z = rng.normal(size=(n, k, r)) * np.sqrt(s / n)
    w = rng.normal(size=(m, k, r)) * np.sqrt(s / n)
    basis = Basis("primal", s, z, np.einsum("mkr,mkq->rq", w, w), m, r)
    return basis, rng.normal(size=(n, k)), rng.normal(size=(m, k)) * 0.1 + 0.5, w


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--targets", type=int, default=1_000)
    parser.add_argument("--rank", type=int, default=4_096)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--t", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    basis, residual, f0, w = synthetic(args.n, args.k, args.rank, args.targets)
    recipe = Recipe(lr=1.0 / float(basis.s.max() / args.n), weight_decay=0.0, t=args.t, dynamics="discrete")
    loo_s = best_of(args.repeat, lambda: loo_quadratic_forms(basis, residual, recipe, None, progress=False))
    matrix = np.empty((args.n, args.targets, args.k), np.float32)

    def keep(start: int, effect: np.ndarray) -> None:
        matrix[start : start + len(effect)] = effect

    attribute_s = best_of(args.repeat, lambda: attribute(basis, residual, f0, w, recipe, 10, on_block=keep))
    print(
        f"n {args.n}, targets {args.targets}, k {args.k}, rank {args.rank}, t {args.t}: loo {loo_s:.1f} s, "
        f"attribute {attribute_s:.1f} s (matrix {matrix.nbytes / 2**20:.0f} MiB kept); beyond loo "
        f"{attribute_s - loo_s:+.1f} s, ratio {attribute_s / loo_s:.2f}"
    )


if __name__ == "__main__":
    main()
