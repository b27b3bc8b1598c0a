"""Benchmark: the leave-one-out solve and scores at n = 1,000,000, Φ and Z streamed from disk.

    python bench/bench_million.py                                   # n = 60,000 and 1,000,000, D = 4,096
    python bench/bench_million.py --sizes 20000 100000 --dim 1024   # a quick look

It shows that time grows linearly in n and memory does not grow at all. At D = 4,096 the 10⁶ run writes
16.4 GB of Φ (float32) and 32.8 GB of Z (float64) under --workdir (default: a temp dir, removed at the
end) and takes about 40 minutes on 2 idle cores.

1. data (once, for the largest size): synthetic Φ in float32 .npy shards of --shard-rows samples, each
   drawn from its own seed: N(0, 1) scaled per column by (j + 1)^-1/2, so that the eigenvalues of ΦᵀΦ
   spread over three decades as a real NTK's do; the residual y − f0 N(0, 1); --n-val validation
   rows. A smaller size reads the first shards.
2. per size, in a fresh process (its peak RSS is its own):
   - basis: `ntk.build_basis` in primal space (D ≤ n): Σ ΦᵀΦ streamed shard by shard, its D × D
     eigendecomposition, then Z = ΦQ written to a `rows.RowFile` (`z_path`), never all in memory;
   - loo + score: `scores.loo_quadratic_forms` (every form, the SGD smoothing's too) reading Z by
     blocks, and `scores_from_forms`: exactly what the loo and score stages run.
Prints seconds per phase, peak RSS, and each size's time ratio to the smallest against the ratio of n
(linear time: the two ratios equal).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import add_recipe_args, environment_lines, stable_lr

from sui_core.linearized.ntk import build_basis
from sui_core.linearized.scores import loo_quadratic_forms, scores_from_forms
from sui_core.linearized.solver import Recipe


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000])
    p.add_argument("--dim", type=int, default=4096, help="D, Jacobian coordinates")
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--shard-rows", type=int, default=20_000, help="samples per Φ shard (the sizes' multiples)")
    add_recipe_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where Φ and Z go (default: a temp dir, removed at the end)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = sorted(set(args.sizes))
    if any(n % args.shard_rows for n in args.sizes):
        p.error(f"every size must be a multiple of --shard-rows {args.shard_rows}")
    return args


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_data(args, wd: Path) -> None:
    """The shards of Φ for the largest size, the residual and Φ_val (seeded, see the module docstring)."""
    scale = ((np.arange(args.dim) + 1.0) ** -0.5).astype(np.float32)

    def draw(seed: list[int], rows: int) -> np.ndarray:
        phi = np.random.default_rng(seed).standard_normal((rows, 1, args.dim), dtype=np.float32)
        return phi * scale

    n = args.sizes[-1]
    for shard in range(n // args.shard_rows):
        path = wd / f"phi_{shard:05d}.npy"
        if not path.exists():
            np.save(wd / "part.npy", draw([args.seed, 1, shard], args.shard_rows))
            os.replace(wd / "part.npy", path)
    np.save(wd / "phi_val.npy", draw([args.seed, 2], args.n_val))
    np.save(wd / "residual.npy", np.random.default_rng([args.seed, 3]).standard_normal((n, 1)))


def worker(args, wd: Path) -> dict:
    n = args.n
    shards = [wd / f"phi_{i:05d}.npy" for i in range(n // args.shard_rows)]
    train = lambda: (np.load(path) for path in shards)  # noqa: E731  (one shard in memory at a time)
    val = lambda: iter([np.load(wd / "phi_val.npy")])  # noqa: E731
    residual = np.load(wd / "residual.npy")[:n]
    z_path = wd / f"z_{n}.npy"
    started = time.perf_counter()
    basis = build_basis(train, val, n, 1, args.dim, z_path=z_path)
    basis_s = time.perf_counter() - started
    s_max = float(basis.s.max(initial=0.0))
    lr, note = stable_lr(args.lr, args.weight_decay, args.dynamics, s_max, n)
    recipe = Recipe(lr, args.weight_decay, args.t, args.dynamics)
    started = time.perf_counter()
    result = loo_quadratic_forms(
        basis, residual, recipe, batch_size=None, tol=args.tol, block_size=args.block_size, progress=False
    )
    loo_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = scores_from_forms(result.forms, basis.n_val, sigma=1.0, lr=recipe.lr, batch_size=n)
    score_s = time.perf_counter() - started
    z_path.unlink()
    return {
        "n": n,
        "D": args.dim,
        "rank": basis.rank,
        "lr": lr,
        "lr_note": note,
        "method": result.plan.method,
        "matvecs": getattr(result.plan, "matvecs", -1),
        "basis_s": basis_s,
        "loo_s": loo_s,
        "score_s": score_s,
        "loo_score_s": loo_s + score_s,
        "peak_rss_gib": peak_rss_gib(),
        "z_gb": n * basis.rank * 8 / 1e9,
        "fsi_median": float(np.median(scores["fsi"])),
        "load_1min": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    wd = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sui_million_", dir="/var/tmp"))
    wd.mkdir(parents=True, exist_ok=True)
    if args.worker:
        (wd / f"solve_{args.n}.json").write_text(json.dumps(worker(args, wd)))
        return 0
    try:
        print("\n".join(environment_lines()), flush=True)
        started = time.perf_counter()
        make_data(args, wd)
        print(f"data: {args.sizes[-1]:,} × {args.dim} float32 in {time.perf_counter() - started:.0f} s", flush=True)
        rows = []
        for n in args.sizes:
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", "--n", str(n), "--workdir", str(wd)]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"n = {n}: the worker failed")
            rows.append(json.loads((wd / f"solve_{n}.json").read_text()))
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]
        recipe = f"lr {args.lr:g} (or lower: lr_note), t {args.t:g}, {args.dynamics}, tol {args.tol:g}"
        print(f"\nD = {args.dim}, k = 1, {recipe}")
        print(
            "| n | basis s | loo + score s | total s | n / first | (loo + score) / first | total / first | "
            "peak RSS GiB | Z GB on disk | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            total, base_total = r["basis_s"] + r["loo_score_s"], base["basis_s"] + base["loo_score_s"]
            print(
                f"| {r['n']:,} | {r['basis_s']:.0f} | {r['loo_score_s']:.0f} | {total:.0f} | "
                f"{r['n'] / base['n']:.1f} | "
                f"{r['loo_score_s'] / base['loo_score_s']:.1f} | {total / base_total:.1f} | {r['peak_rss_gib']:.2f} | "
                f"{r['z_gb']:.1f} | {r['load_1min']:.1f} |"
            )
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
