"""Benchmark: the two Chebyshev recurrences of the leave-one-out solve against each other, per k.

    python bench/bench_left_out.py [--ks 1 2 3 4 5 10] [--rank 1000] [--degree 177] [--samples 512]

For each number of outputs k it times, on the same synthetic block problem (rank r, Chebyshev degree m,
`--samples` samples), `sui_core.linearized.solver.chebyshev_left_out` (the recurrence on m×k moment
coefficients, O(r·m·k²) a sample) and `chebyshev_left_out_direct` (on the r-vectors, O(r·m·k)), each in
blocks of the size the solver would use (`left_out_block_size`), and prints ms per sample, their ratio,
which one the solver picks (k ≥ DIRECT_MIN_K: direct) and how far apart the two results are. Degree 177
is the default recipe's on the Fashion-MNIST 60,000 example (lr 0.01, t 2000, D = 1,000).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import environment_lines

from sui_core.linearized.solver import (
    DIRECT_MIN_K,
    chebyshev_left_out,
    chebyshev_left_out_direct,
    chebyshev_vandermonde,
    direct_block_size,
    moments_block_size,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 10])
    p.add_argument("--rank", type=int, default=1000, help="r, the basis rank")
    p.add_argument("--degree", type=int, default=177, help="m, the Chebyshev degree")
    p.add_argument("--samples", type=int, default=512, help="samples solved per method and k")
    p.add_argument("--block-size", type=int, default=256, help="loo.block_size (capped per method)")
    return p.parse_args(argv)


def timed(solve, z: np.ndarray, b: np.ndarray, block: int) -> tuple[float, np.ndarray]:
    """Seconds per sample of `solve` over all samples in blocks of `block`, and its results."""
    out = np.empty_like(b)
    started = time.perf_counter()
    for lo in range(0, len(b), block):
        out[lo : lo + block] = solve(z[lo : lo + block], b[lo : lo + block])
    return (time.perf_counter() - started) / len(b), out


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    r, m, alpha = args.rank, args.degree, 0.5
    d_hat = np.sort(rng.uniform(-1, 1, r))
    v = chebyshev_vandermonde(d_hat, m)
    coeffs = rng.normal(size=m + 1) / np.arange(1, m + 2)
    print("\n".join(environment_lines()))
    print(f"r = {r}, degree m = {m}, {args.samples} samples, float64; the solver uses direct from k = {DIRECT_MIN_K}")
    print(f"{'k':>3} {'moments ms':>11} {'direct ms':>10} {'direct/moments':>15} {'picked':>8} {'max rel diff':>13}")
    for k in args.ks:
        z = rng.normal(size=(args.samples, k, r)) / (2 * np.sqrt(r * k))
        b = rng.normal(size=(args.samples, r))
        moments_s, moments = timed(
            lambda zb, bb: chebyshev_left_out(v, alpha, zb, bb, coeffs), z, b, moments_block_size(k, r, args.block_size)
        )
        direct_s, direct = timed(
            lambda zb, bb: chebyshev_left_out_direct(d_hat, alpha, zb, bb, coeffs),
            z,
            b,
            direct_block_size(k, r, args.block_size),
        )
        diff = np.abs(direct - moments).max() / np.abs(moments).max()
        picked = "direct" if k >= DIRECT_MIN_K else "moments"
        print(
            f"{k:>3} {moments_s * 1e3:>11.3f} {direct_s * 1e3:>10.3f} {direct_s / moments_s:>15.2f} "
            f"{picked:>8} {diff:>13.1e}"
        )


if __name__ == "__main__":
    main()
