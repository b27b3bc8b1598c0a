"""Benchmark: sui at scale on Fashion-MNIST — n = 1,000 / 6,000 / 60,000, against the paper's algorithm.

    python bench/bench_scale.py [--sizes 1000 6000 60000] [--quick] [--skip-paper] [--csv bench/scale.csv]

One command; each measurement runs in a fresh subprocess of this script (`--worker ...`), so that peak
memory (ru_maxrss) of one size does not mix with another's:

1. jacobians  Φ of the default MLP (784-1024-1, seeded init) for the largest n and the validation set,
              `coordinates` projection at D = --dim (p = 2047 per tensor gives 4096), written once into
              a temporary .npy (np.memmap) that every later step maps read-only; smaller sizes use the
              first n rows (nested subsets of one seeded permutation).
2. solve (n)  the timed hot path on the first n samples: `build_basis` (streamed from the memmap in
              chunks) + `loo_quadratic_forms` + `scores_from_forms`, float64; wall time per phase,
              peak RSS, and a cProfile of the run (function-level, negligible overhead here).
3. paper      at n = 1000 (else the smallest size): sui (best of 3), brute force
              (`reference.brute_force_deltas`) and the paper's kernel-space algorithm
              (`reference.paper_kernel_deltas`, Appendix E) on a few samples each, EXTRAPOLATED
              linearly to n; F-SI and ‖Δv‖² compared on those samples.
4. check      at the largest n: --check-samples samples against t explicit gradient-descent steps of
              all their left-out problems at once in the primal D-space ((D×D)@(D×m) products on
              ΦᵀΦ computed independently of sui's eigenbasis).
5. gemm, throughput  float64/float32 GEMM rate (4096×4096 @ 4096×4096) and Jacobian throughput of the
              MLP and the paper's 4-layer CNN at D ≈ --dim.

Data: Fashion-MNIST from the IDX files of the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist). k = 1. By default every size uses all 10 classes mapped to a binary
target, label = 1 if class < 5 (T-shirt, trouser, pullover, dress, coat) else 0 (sandal, shirt,
sneaker, bag, ankle boot): two classes have only 12,000 training images, too few for n = 60,000, and one
mapping for all sizes keeps the time-vs-n fit on one distribution. `--classes A B` uses two classes
(label = class == B) instead, for n ≤ 12,000. Validation: --n-val images of the t10k file (same classes).
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import gzip
import json
import math
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import add_recipe_args, environment_lines, jacobian_model, jacobians, max_rel, stable_lr

from sui_core.linearized.ntk import build_basis
from sui_core.linearized.scores import loo_quadratic_forms, scores_from_forms
from sui_core.linearized.solver import Recipe

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
CHUNK = 2048  # rows of Φ per block streamed from the memmap into build_basis
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 6000, 60000])
    p.add_argument("--quick", action="store_true", help="sizes 1000 3000 6000 only")
    p.add_argument("--skip-paper", action="store_true", help="skip the paper's algorithm (brute force still runs)")
    p.add_argument("--dim", type=int, default=4096, help="D, projected Jacobian coordinates")
    p.add_argument("--n-val", type=int, default=1000, help="validation images (t10k file)")
    p.add_argument(
        "--classes",
        type=int,
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="two Fashion-MNIST classes (n ≤ 12000) instead of all 10 mapped to class < 5",
    )
    add_recipe_args(p)
    p.add_argument("--brute-samples", type=int, default=10, help="brute force samples at n = 1000")
    p.add_argument("--paper-samples", type=int, default=10, help="paper-algorithm samples at n = 1000")
    p.add_argument("--check-samples", type=int, default=50, help="samples of the exact check at the largest n")
    p.add_argument("--throughput-samples", type=int, default=640, help="samples per arch for Jacobian throughput")
    p.add_argument("--no-profile", action="store_true", help="no cProfile of the solve runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where Φ is cached (default: a temp dir, removed at the end)")
    p.add_argument("--csv", default="bench/scale.csv")
    p.add_argument(
        "--report-from",
        default=None,
        metavar="DIR",
        help="only print the report (and CSV) from the results kept in a --workdir DIR of an earlier run",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [1000, 3000, 6000]
    args.sizes = sorted(set(args.sizes))
    return args


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def log(msg: str) -> None:
    print(f"  {msg}", flush=True)


# --------------------------------------------------------------------------------------------- data


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 IDX file; the project's reader when it has one, else numpy + gzip."""
    try:
        from sui_core.data.splits import read_idx as project_read_idx

        return np.asarray(project_read_idx(path, ndim))
    except ImportError:
        pass
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:4] != bytes([0, 0, 8, ndim]):
        raise SystemExit(f"{path}: not a uint8 IDX file of {ndim} dimensions")
    dims = [int(d) for d in np.frombuffer(raw, ">i4", ndim, 4)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 1, 28, 28) float32 in [0, 1] and class labels of the `train` or `t10k` file."""

    def find(name):
        for candidate in (FASHION_ROOT / f"{name}.gz", FASHION_ROOT / name):
            if candidate.is_file():
                return candidate
        raise SystemExit(f"{FASHION_ROOT / name}[.gz] not found: install the Debian package dataset-fashion-mnist")

    x = read_idx(find(f"{part}-images-idx3-ubyte"), 3)
    y = read_idx(find(f"{part}-labels-idx1-ubyte"), 1)
    return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64)


def select(y: np.ndarray, classes, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` indices of a seeded permutation of the pool, and their binary labels."""
    pool = np.arange(len(y)) if classes is None else np.flatnonzero(np.isin(y, classes))
    if count > len(pool):
        raise SystemExit(
            f"n = {count} but the pool has {len(pool)} images"
            f"{'' if classes is None else f' of classes {classes}: drop --classes'}"
        )
    idx = rng.permutation(pool)[:count]
    label = (y[idx] < 5) if classes is None else (y[idx] == classes[1])
    return idx, label.astype(np.int64)


def data_info(args) -> str:
    if args.classes is None:
        return "Fashion-MNIST, all 10 classes, binary label = class < 5"
    return f"Fashion-MNIST classes {args.classes[0]} vs {args.classes[1]}, label = class == {args.classes[1]}"


# ------------------------------------------------------------------------------------------ workers


def worker_jacobians(args, wd: Path) -> dict:
    from sui_core.network.outputs import targets

    n = max(args.sizes)
    rng = np.random.default_rng(args.seed)
    x, y = fashion("train")
    train, label = select(y, args.classes, n, rng)
    x_test, y_test = fashion("t10k")
    val, _ = select(y_test, args.classes, args.n_val, rng)
    model, projector, per_tensor = jacobian_model("mlp", args.dim, args.seed)
    dim = projector.total_dim
    phi = np.lib.format.open_memmap(wd / "phi.npy", mode="w+", dtype=np.float32, shape=(n, 1, dim))
    started = time.perf_counter()
    f0 = np.empty((n, 1))
    step = 10240
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        f0[lo:hi], _ = jacobians(model, projector, x[train[lo:hi]], out=phi[lo:hi])
        log(f"[jacobians] {hi}/{n} samples, {hi / (time.perf_counter() - started):.0f} samples/s")
    phi.flush()
    seconds = time.perf_counter() - started
    del phi
    _, phi_val = jacobians(model, projector, x_test[val])
    np.save(wd / "phi_val.npy", phi_val)
    np.save(wd / "residual.npy", targets(label, 2) - f0)
    return {
        "n": n,
        "D": dim,
        "p": per_tensor,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "positives": int(label.sum()),
        "peak_rss_gib": peak_rss_gib(),
    }


def load_problem(wd: Path, n: int):
    phi = np.load(wd / "phi.npy", mmap_mode="r")[:n]
    residual = np.load(wd / "residual.npy")[:n]
    phi_val = np.load(wd / "phi_val.npy")
    return phi, residual, phi_val


def recipe_for(args, s_max: float, n: int) -> tuple[Recipe, str]:
    lr, note = stable_lr(args.lr, args.weight_decay, args.dynamics, s_max, n)
    return Recipe(lr, args.weight_decay, args.t, args.dynamics), note


def profile_top(prof: cProfile.Profile, count: int = 12) -> list[dict]:
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(file).name}:{line}" if file != "~" else "builtin"
        rows.append({"function": f"{func} ({where})", "calls": ncalls, "tottime": tottime, "cumtime": cumtime})
    return sorted(rows, key=lambda r: -r["tottime"])[:count]


def eigh_seconds(prof: cProfile.Profile) -> float:
    stats = pstats.Stats(prof)
    return sum(v[3] for (file, _, func), v in stats.stats.items() if func in ("eigh", "eigvalsh"))


def worker_solve(args, wd: Path) -> dict:
    n = args.n
    phi, residual, phi_val = load_problem(wd, n)
    _, k, dim = phi.shape
    rss_loaded = peak_rss_gib()
    train = lambda: (phi[lo : lo + CHUNK] for lo in range(0, n, CHUNK))  # noqa: E731
    val = lambda: (phi_val[lo : lo + CHUNK] for lo in range(0, len(phi_val), CHUNK))  # noqa: E731

    prof_basis, prof_loo = cProfile.Profile(), cProfile.Profile()
    profile = not args.no_profile
    started = time.perf_counter()
    if profile:
        prof_basis.enable()
    basis = build_basis(train, val, n, k, dim)
    if profile:
        prof_basis.disable()
    t_basis = time.perf_counter() - started
    s_max = float(basis.s.max(initial=0.0))
    recipe, note = recipe_for(args, s_max, n)
    started = time.perf_counter()
    if profile:
        prof_loo.enable()
    result = loo_quadratic_forms(
        basis,
        residual,
        recipe,
        batch_size=None,
        tol=args.tol,
        block_size=args.block_size,
        dtype="float64",
        progress=False,
    )
    t_loo = time.perf_counter() - started
    scores = scores_from_forms(result.forms, basis.n_val, sigma=1.0, lr=recipe.lr, batch_size=n)
    if profile:
        prof_loo.disable()
    t_score = time.perf_counter() - t_loo - started
    np.savez(wd / f"forms_{n}.npz", fsi=scores["fsi"], dv_sq=result.forms["dv_sq"])
    plan = result.plan
    out = {
        "n": n,
        "k": k,
        "D": dim,
        "space": basis.space,
        "rank": basis.rank,
        "n_val": basis.n_val,
        "s_max": s_max,
        "lr": recipe.lr,
        "lr_note": note,
        "eta_t_hmax": recipe.lr / n * recipe.t * s_max,
        "method": getattr(plan, "method", "?"),
        "matvecs": getattr(plan, "matvecs", -1),
        "basis_s": t_basis,
        "loo_s": t_loo,
        "score_s": t_score,
        "loo_score_s": t_loo + t_score,
        "total_s": t_basis + t_loo + t_score,
        "peak_rss_gib": peak_rss_gib(),
        "rss_loaded_gib": rss_loaded,
        "fsi_median": float(np.median(scores["fsi"])),
        "profiled": profile,
        "load_1min": os.getloadavg()[0],
    }
    if profile:
        out.update(
            eigh_basis_s=eigh_seconds(prof_basis),
            eigh_loo_s=eigh_seconds(prof_loo),
            profile_basis=profile_top(prof_basis),
            profile_loo=profile_top(prof_loo),
        )
    return out


def worker_paper(args, wd: Path) -> dict:
    """sui (best of 3), brute force and the paper's algorithm at n = args.n, in memory."""
    from bench_loo import run_brute, run_sui

    from sui_core.linearized.reference import paper_kernel_deltas

    n = args.n
    phi, residual, phi_val = load_problem(wd, n)
    phi = np.ascontiguousarray(phi)
    rows = phi.reshape(-1, phi.shape[-1]).astype(np.float64)
    s_max = float(np.linalg.eigvalsh(rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows)[-1])
    recipe, _ = recipe_for(args, s_max, n)
    sui_s, _, basis, result, scores = run_sui(phi, residual, phi_val, recipe, args.block_size, args.tol, repeat=3)
    out = {"n": n, "sui_s": sui_s, "lr": recipe.lr}

    brute_idx = np.unique(np.linspace(0, n - 1, min(args.brute_samples, n)).round().astype(int))
    brute_s, brute_checked, fsi_bf, dvsq_bf = run_brute(phi, residual, phi_val, recipe, brute_idx)
    out.update(
        brute_s=brute_s,
        brute_checked_s=brute_checked,
        brute_samples=len(brute_idx),
        brute_fsi_maxrel=max_rel(scores["fsi"][brute_idx], fsi_bf),
        brute_dvsq_maxrel=max_rel(result.forms["dv_sq"][brute_idx], dvsq_bf),
    )
    log(f"[paper n={n}] sui {sui_s:.2f} s; brute force {brute_checked:.1f} s on {len(brute_idx)} samples")

    if not args.skip_paper:
        full, left = recipe.full(n), recipe.left_out(n)
        started = time.perf_counter()
        paper_kernel_deltas(phi, residual, full, left, [], phi_val)
        setup = time.perf_counter() - started
        idx = np.unique(np.linspace(0, n - 1, min(args.paper_samples, n)).round().astype(int))
        started = time.perf_counter()
        dw, dval = paper_kernel_deltas(phi, residual, full, left, idx, phi_val)
        checked = time.perf_counter() - started
        per_sample = max(checked - setup, 0.0) / len(idx)
        n_val = len(phi_val)
        fsi_paper = np.sum(dval**2, axis=1) / (2 * n_val)
        out.update(
            paper_s=setup + n * per_sample,
            paper_setup_s=setup,
            paper_per_sample_s=per_sample,
            paper_checked_s=checked,
            paper_samples=len(idx),
            paper_fsi_maxrel=max_rel(scores["fsi"][idx], fsi_paper),
            paper_dvsq_maxrel=max_rel(result.forms["dv_sq"][idx], np.sum(dw**2, axis=1)),
        )
        # the paper's algorithm against brute force on the samples both checked: whose is a difference?
        both, at_paper, at_brute = np.intersect1d(idx, brute_idx, return_indices=True)
        if len(both):
            out["paper_vs_brute_fsi_maxrel"] = max_rel(fsi_paper[at_paper], fsi_bf[at_brute])
            out["paper_vs_brute_samples"] = len(both)
        log(f"[paper n={n}] paper's algorithm {checked:.1f} s on {len(idx)} samples (setup {setup:.2f} s)")
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def worker_check(args, wd: Path) -> dict:
    """Exact, independent Δv for m samples at n: t gradient steps of all m left-out problems (and the
    full one) at once in the primal D-space, on ΦᵀΦ accumulated here from the memmap in float64."""
    n = args.n
    solve = json.loads((wd / f"solve_{n}.json").read_text())
    phi, residual, phi_val = load_problem(wd, n)
    _, k, dim = phi.shape
    recipe = Recipe(solve["lr"], args.weight_decay, args.t, args.dynamics)
    full, left = recipe.full(n), recipe.left_out(n)
    if args.dynamics != "discrete" and not math.isinf(args.t):
        return {"n": n, "skipped": "the explicit-step check needs discrete dynamics or t = inf"}
    started = time.perf_counter()
    gram = np.zeros((dim, dim))
    rhs = np.zeros(dim)
    for lo in range(0, n, CHUNK):
        rows = np.asarray(phi[lo : lo + CHUNK], np.float64).reshape(-1, dim)
        gram += rows.T @ rows
        rhs += rows.T @ residual[lo : lo + CHUNK].reshape(-1)
    rows_val = np.asarray(phi_val, np.float64).reshape(-1, dim)
    gram_val = rows_val.T @ rows_val
    idx = np.unique(np.linspace(0, n - 1, min(args.check_samples, n)).round().astype(int))
    m = len(idx)
    phi_s = np.asarray(phi[idx], np.float64)  # (m, k, D)
    b = np.empty((dim, m + 1))
    b[:, :m] = rhs[:, None] - np.einsum("mkd,mk->dm", phi_s, residual[idx])
    b[:, m] = rhs
    t_gram = time.perf_counter() - started
    started = time.perf_counter()
    if math.isinf(args.t):
        v = np.empty((dim, m + 1))
        for j in range(m):
            h = gram + left.lam * np.eye(dim) - phi_s[j].T @ phi_s[j]
            v[:, j] = np.linalg.solve(h, b[:, j])
        v[:, m] = np.linalg.solve(gram + full.lam * np.eye(dim), rhs)
    else:
        eta = np.array([left.eta] * m + [full.eta])
        lam = np.array([left.lam] * m + [full.lam])
        v = np.zeros((dim, m + 1))
        for _ in range(int(args.t)):
            grad = gram @ v
            grad[:, :m] -= np.einsum("mkd,mk->dm", phi_s, np.einsum("mkd,dm->mk", phi_s, v[:, :m]))
            v -= eta * (grad + lam * v - b)
    t_steps = time.perf_counter() - started
    dv = v[:, m:] - v[:, :m]  # (D, m): Δv_i = v − v_{−i}
    fsi = np.einsum("dm,dm->m", gram_val @ dv, dv) / (2 * len(phi_val))
    dv_sq = np.einsum("dm,dm->m", dv, dv)
    forms = np.load(wd / f"forms_{n}.npz")
    return {
        "n": n,
        "samples": m,
        "gram_s": t_gram,
        "steps_s": t_steps,
        "fsi_maxrel": max_rel(forms["fsi"][idx], fsi),
        "dvsq_maxrel": max_rel(forms["dv_sq"][idx], dv_sq),
        "peak_rss_gib": peak_rss_gib(),
    }


def worker_gemm(args, wd: Path) -> dict:
    out = {}
    rng = np.random.default_rng(0)
    size = 4096
    for dtype in ("float64", "float32"):
        a = rng.standard_normal((size, size)).astype(dtype)
        b = rng.standard_normal((size, size)).astype(dtype)
        a @ b  # warm-up
        best = min(_timed(lambda: a @ b) for _ in range(3))
        out[f"gemm_{dtype}_gflops"] = 2 * size**3 / best / 1e9
    return out


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def worker_throughput(args, wd: Path) -> dict:
    import torch

    x, _ = fashion("train")
    x = x[: args.throughput_samples]
    out = {"torch_threads": torch.get_num_threads()}
    for arch in ("mlp", "cnn"):
        model, projector, per_tensor = jacobian_model(arch, args.dim, args.seed)
        jacobians(model, projector, x[:64])  # warm-up
        started = time.perf_counter()
        jacobians(model, projector, x)
        seconds = time.perf_counter() - started
        out[arch] = {
            "D": projector.total_dim,
            "p": per_tensor,
            "samples_per_s": len(x) / seconds,
            "params": sum(p.numel() for p in model.parameters()),
        }
    return out


WORKERS = {
    "jacobians": worker_jacobians,
    "solve": worker_solve,
    "paper": worker_paper,
    "check": worker_check,
    "gemm": worker_gemm,
    "throughput": worker_throughput,
}


# --------------------------------------------------------------------------------------------- main


def spawn(argv: list[str], name: str, wd: Path, n: int | None = None) -> dict:
    """Run one worker in a fresh Python process; its result comes back as JSON in the workdir."""
    out = wd / (f"{name}_{n}.json" if n is not None else f"{name}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name, "--workdir", str(wd)]
    if n is not None:
        cmd += ["--n", str(n)]
    started = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name}{'' if n is None else f' n={n}'} failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    result["_wall_s"] = time.perf_counter() - started
    return result


def loglog_slope(ns, ts) -> float:
    if len(ns) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def dense_flops(solve: dict) -> dict[str, float]:
    """GEMM-equivalent flops (2·m·n·k per product) of the dense products a solver of sui's design
    does, estimated from the shapes; `matrix_free` are the per-sample operator products (elementwise)."""
    n, k, dim, r, n_val = solve["n"], solve["k"], solve["D"], solve["rank"], solve["n_val"]
    nk = n * k
    # AᵀA runs as SYRK in numpy (one triangle: half a GEMM's flops), so the Grams count m·n².
    if solve["space"] == "primal":
        basis = {"PhiT_Phi (syrk)": nk * dim**2, "Z=PhiQ": 2 * nk * dim * r}
    else:
        basis = {"Phi_PhiT (syrk)": nk**2 * dim, "V=PhiT_U": 2 * nk * dim * r}
    basis["val (minor)"] = 2 * n_val * k * dim * r
    loo = {"forms dc@G_val": 2 * n * r**2, "forms dc@Sigma+": 2 * n * r**2, "SGD Lambda=grads^T grads (syrk)": n * r**2}
    matrix_free = max(solve.get("matvecs", 0), 0) * 4 * nk * r
    return {"basis": basis, "loo": loo, "matrix_free": matrix_free}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args, Path(args.workdir))
        name = f"{args.worker}_{args.n}.json" if args.n is not None else f"{args.worker}.json"
        (Path(args.workdir) / name).write_text(json.dumps(result, indent=1))
        return 0

    if args.report_from:
        wd = Path(args.report_from)
        load = lambda name: json.loads((wd / f"{name}.json").read_text())  # noqa: E731
        n_cmp = 1000 if 1000 in args.sizes else args.sizes[0]
        check = wd / f"check_{args.sizes[-1]}.json"
        report(
            args,
            load("gemm"),
            load("throughput"),
            load("jacobians"),
            [load(f"solve_{n}") for n in args.sizes],
            load(f"paper_{n_cmp}"),
            json.loads(check.read_text()) if check.is_file() else None,
        )
        return 0

    print("sui scale benchmark")
    for line in environment_lines():
        print("  " + line)
    print(
        f"  data: {data_info(args)}; validation {args.n_val} (t10k); k = 1; MLP 784-1024-1 at seeded init, "
        f"coordinates projection, D = {args.dim} asked",
        flush=True,
    )
    own_dir = args.workdir is None
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="sui-bench-scale-"))
    wd.mkdir(parents=True, exist_ok=True)
    argv = [a for a in argv if a != "--quick"] + ["--sizes", *map(str, args.sizes)]
    try:
        return run_all(args, argv, wd)
    finally:
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)


def run_all(args, argv, wd: Path) -> int:
    jac = spawn(argv, "jacobians", wd)
    log(
        f"Φ of {jac['n']} samples (D = {jac['D']}, p = {jac['p']}) in {jac['seconds']:.0f} s; "
        f"{jac['positives']} positives"
    )
    gemm = spawn(argv, "gemm", wd)
    log(f"GEMM 4096: {gemm['gemm_float64_gflops']:.1f} GFLOP/s float64, {gemm['gemm_float32_gflops']:.1f} float32")
    thr = spawn(argv, "throughput", wd)
    solves = []
    for n in args.sizes:
        s = spawn(argv, "solve", wd, n)
        solves.append(s)
        log(
            f"n = {n}: basis {s['basis_s']:.1f} s, loo+score {s['loo_score_s']:.1f} s, peak RSS "
            f"{s['peak_rss_gib']:.2f} GiB{'; ' + s['lr_note'] if s['lr_note'] else ''}"
        )
    n_cmp = 1000 if 1000 in args.sizes else args.sizes[0]
    paper = spawn(argv, "paper", wd, n_cmp)
    check = spawn(argv, "check", wd, args.sizes[-1]) if args.check_samples > 0 else None
    report(args, gemm, thr, jac, solves, paper, check)
    return 0


def report(args, gemm, thr, jac, solves, paper, check) -> None:
    rows = []  # long-format CSV: section, n, metric, value, unit

    def put(section, n, metric, value, unit=""):
        rows.append(
            {
                "section": section,
                "n": "" if n is None else n,
                "metric": metric,
                "value": f"{value:.6g}" if isinstance(value, float) else value,
                "unit": unit,
            }
        )

    print()
    print(
        f"recipe: lr={args.lr:g} weight_decay={args.weight_decay:g} t={args.t:g} {args.dynamics}; "
        f"loo.tol={args.tol:g} block_size={args.block_size}; float64; wall-clock seconds; one run per size, "
        "each in a fresh process"
    )
    print(f"data: {data_info(args)}; n_val = {solves[0]['n_val']}; D = {jac['D']} (p = {jac['p']} per tensor)")
    print(
        "basis = build_basis (ΦᵀΦ or ΦΦᵀ streamed from a float32 memmap, eigh, Z, G_val); "
        "loo+score = loo_quadratic_forms + scores_from_forms; jac* = n / measured MLP Jacobian throughput"
    )
    header = (
        f"{'n':>6} {'space':>6} {'rank':>5} {'lr':>7} {'η·t·hmax':>9} {'method':>9} {'mv':>5} "
        f"{'jac s*':>7} {'basis s':>8} {'loo+sc s':>9} {'total s':>8} {'peak GiB':>9} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for s in solves:
        jac_s = s["n"] / jac["samples_per_s"]
        print(
            f"{s['n']:>6} {s['space']:>6} {s['rank']:>5} {s['lr']:>7.3g} {s['eta_t_hmax']:>9.3g} "
            f"{s['method']:>9} {s['matvecs']:>5} {jac_s:>7.0f} {s['basis_s']:>8.2f} {s['loo_score_s']:>9.2f} "
            f"{s['total_s']:>8.2f} {s['peak_rss_gib']:>9.2f} {s['load_1min']:>5.1f}"
        )
        for key, unit in (
            ("space", ""),
            ("rank", ""),
            ("lr", ""),
            ("eta_t_hmax", ""),
            ("method", ""),
            ("matvecs", ""),
            ("basis_s", "s"),
            ("loo_score_s", "s"),
            ("total_s", "s"),
            ("peak_rss_gib", "GiB"),
            ("rss_loaded_gib", "GiB"),
            ("load_1min", ""),
        ):
            put("size", s["n"], key, s[key], unit)
        put("size", s["n"], "jacobians_s_extrapolated", jac_s, "s")
        if s["lr_note"]:
            print(f"       n = {s['n']}: {s['lr_note']}")
    print(
        "peak GiB = ru_maxrss of the solve process (includes the Φ pages mapped from the memmap: "
        f"n·D·4 bytes = {solves[-1]['n'] * jac['D'] * 4 / GIB:.2f} GiB at n = {solves[-1]['n']}); "
        f"load = 1-minute load average at the end of the solve ({os.cpu_count()} CPUs: other work slows it)"
    )

    ns = [s["n"] for s in solves]
    print()
    if len(ns) >= 2:
        slopes = {key: loglog_slope(ns, [s[key] for s in solves]) for key in ("basis_s", "loo_score_s", "total_s")}
        print(
            f"time ∝ n^a, log-log least squares over n = {ns}: basis a = {slopes['basis_s']:.2f}, "
            f"loo+score a = {slopes['loo_score_s']:.2f}, total a = {slopes['total_s']:.2f}"
        )
        for key, a in slopes.items():
            put("fit", None, f"exponent_{key}", a)
    by_n = {s["n"]: s for s in solves}
    ratio = None
    if 60000 in by_n and 6000 in by_n:
        ratio = by_n[60000]["total_s"] / by_n[6000]["total_s"]
        print(
            f"time(60000)/time(6000) = {ratio:.2f} total, "
            f"{by_n[60000]['loo_score_s'] / by_n[6000]['loo_score_s']:.2f} loo+score (linear would be 10)"
        )
        put("fit", None, "time_60000_over_6000", ratio)

    # ---- n = 1000: sui vs brute force vs the paper
    p = paper
    print()
    print(
        f"n = {p['n']}: sui vs brute force vs the paper's algorithm (F-SI and ‖Δv‖² max relative difference "
        "on the checked samples; * = EXTRAPOLATED linearly from the checked samples)"
    )
    print(f"  sui (basis+loo+score, all {p['n']} samples, best of 3)       {p['sui_s']:>9.2f} s")
    print(
        f"  brute force* (reference.brute_force_deltas, {p['brute_samples']} samples measured in "
        f"{p['brute_checked_s']:.1f} s)  {p['brute_s']:>9.1f} s   sui {p['brute_s'] / p['sui_s']:>6.0f}x faster"
        f"   F-SI {p['brute_fsi_maxrel']:.1e}  ‖Δv‖² {p['brute_dvsq_maxrel']:.1e}"
    )
    put("n1000", p["n"], "sui_s", p["sui_s"], "s")

    def put_reference(method: str) -> None:  # the same CSV rows for brute force and the paper
        put("n1000", p["n"], f"{method}_s_extrapolated", p[f"{method}_s"], "s")
        put("n1000", p["n"], f"{method}_samples", p[f"{method}_samples"])
        put("n1000", p["n"], f"speedup_vs_{method}", p[f"{method}_s"] / p["sui_s"], "x")
        put("n1000", p["n"], f"fsi_maxrel_vs_{method}", p[f"{method}_fsi_maxrel"])
        put("n1000", p["n"], f"dvsq_maxrel_vs_{method}", p[f"{method}_dvsq_maxrel"])

    put_reference("brute")
    if "paper_s" in p:
        print(
            f"  paper* (Appendix E: inverse downdate + eigh of Θ₋ᵢ per sample; {p['paper_samples']} samples, "
            f"{p['paper_per_sample_s']:.2f} s each + setup {p['paper_setup_s']:.2f} s)  {p['paper_s']:>9.1f} s   "
            f"sui {p['paper_s'] / p['sui_s']:>6.0f}x faster   F-SI {p['paper_fsi_maxrel']:.1e}  "
            f"‖Δv‖² {p['paper_dvsq_maxrel']:.1e}"
        )
        if "paper_vs_brute_fsi_maxrel" in p:
            print(
                f"  (the paper's algorithm vs brute force on the {p['paper_vs_brute_samples']} samples both checked: "
                f"F-SI {p['paper_vs_brute_fsi_maxrel']:.1e})"
            )
            put("n1000", p["n"], "paper_vs_brute_fsi_maxrel", p["paper_vs_brute_fsi_maxrel"])
        put_reference("paper")
        put("n1000", p["n"], "paper_per_sample_s", p["paper_per_sample_s"], "s")

    # ---- GEMM rates
    big = solves[-1]
    flops = dense_flops(big)
    print()
    g64 = gemm["gemm_float64_gflops"]
    print(
        f"GEMM rate, numpy 4096×4096 @ 4096×4096: float64 {g64:.1f} GFLOP/s, float32 "
        f"{gemm['gemm_float32_gflops']:.1f} GFLOP/s"
    )
    put("gemm", None, "gemm_float64_gflops", g64, "GFLOP/s")
    put("gemm", None, "gemm_float32_gflops", gemm["gemm_float32_gflops"], "GFLOP/s")
    basis_flops = sum(flops["basis"].values())
    loo_flops = sum(flops["loo"].values())
    print(
        f"dense products inside sui at n = {big['n']} (flops estimated from shapes: 2mnk per product, "
        "m·n² for a Gram AᵀA):"
    )
    print("  basis: " + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in flops["basis"].items()) + " TFLOP")
    print(
        "  loo+score: "
        + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in flops["loo"].items())
        + f" TFLOP; + matrix-free operator products {flops['matrix_free'] / 1e12:.2f} TFLOP "
        f"({big['matvecs']} per sample, elementwise)"
    )
    if big.get("profiled"):
        gemm_time = big["basis_s"] - big["eigh_basis_s"]
        rate = basis_flops / gemm_time / 1e9
        print(
            f"  basis: {basis_flops / 1e12:.2f} TFLOP in {gemm_time:.1f} s (basis {big['basis_s']:.1f} s minus "
            f"eigh {big['eigh_basis_s']:.1f} s) = {rate:.1f} GFLOP/s = {rate / g64:.2f} × the GEMM rate"
        )
        put("gemm", big["n"], "basis_dense_gflops", rate, "GFLOP/s")
        put("gemm", big["n"], "basis_dense_over_gemm", rate / g64)
        put("gemm", big["n"], "eigh_basis_s", big["eigh_basis_s"], "s")
        loo_time = big["loo_score_s"] - big["eigh_loo_s"]
        rate = (loo_flops + flops["matrix_free"]) / loo_time / 1e9
        print(
            f"  loo+score: {(loo_flops + flops['matrix_free']) / 1e12:.2f} TFLOP (dense + matrix-free) in "
            f"{loo_time:.1f} s (minus eigh {big['eigh_loo_s']:.1f} s) = {rate:.1f} GFLOP/s = {rate / g64:.2f} × "
            "the GEMM rate"
        )
        put("gemm", big["n"], "loo_score_effective_gflops", rate, "GFLOP/s")
        put("gemm", big["n"], "loo_score_effective_over_gemm", rate / g64)
        put("gemm", big["n"], "eigh_loo_s", big["eigh_loo_s"], "s")
    total_rate = (basis_flops + loo_flops + flops["matrix_free"]) / big["total_s"] / 1e9
    print(
        f"  all of it over the total {big['total_s']:.1f} s: {total_rate:.1f} GFLOP/s = {total_rate / g64:.2f} × "
        "the GEMM rate"
    )
    put("gemm", big["n"], "total_effective_gflops", total_rate, "GFLOP/s")

    # ---- Jacobian throughput
    print()
    print(
        f"Jacobian throughput (per_sample_jacobians + coordinates projection, batch 64, "
        f"{args.throughput_samples} samples, torch threads = {thr['torch_threads']}):"
    )
    for arch, label in (("mlp", "MLP 784-1024-1"), ("cnn", "4-layer CNN (paper)")):
        t = thr[arch]
        print(
            f"  {label:<22} {t['params']:>8} params, p = {t['p']:>4} per tensor, D = {t['D']}: "
            f"{t['samples_per_s']:.0f} samples/s"
        )
        put("jacobians", None, f"{arch}_samples_per_s", t["samples_per_s"], "samples/s")
        put("jacobians", None, f"{arch}_D", t["D"])
        put("jacobians", None, f"{arch}_p", t["p"])
    print(
        f"  MLP over the whole extraction: {jac['n']} samples in {jac['seconds']:.0f} s = "
        f"{jac['samples_per_s']:.0f} samples/s (written to the memmap)"
    )
    put("jacobians", jac["n"], "mlp_extraction_s", jac["seconds"], "s")

    # ---- exact check at the largest n
    if check is not None:
        print()
        if "skipped" in check:
            print(f"check at n = {check['n']}: skipped ({check['skipped']})")
        else:
            print(
                f"check at n = {check['n']}: {check['samples']} samples against {args.t:g} explicit gradient steps "
                f"of all their left-out problems at once (D-space, ΦᵀΦ accumulated independently; "
                f"{check['gram_s']:.0f} s + {check['steps_s']:.0f} s): max relative error F-SI "
                f"{check['fsi_maxrel']:.1e}, ‖Δv‖² {check['dvsq_maxrel']:.1e}"
            )
            for key in ("samples", "fsi_maxrel", "dvsq_maxrel", "steps_s"):
                put("check", check["n"], key, check[key])

    # ---- where the time goes
    if big.get("profiled"):
        print()
        print(f"where the time goes at n = {big['n']} (cProfile, top functions by own time):")
        for phase in ("basis", "loo"):
            print(f"  {'build_basis' if phase == 'basis' else 'loo_quadratic_forms + scores_from_forms'}:")
            for r in big[f"profile_{phase}"][:8]:
                print(
                    f"    {r['tottime']:>8.2f} s own {r['cumtime']:>8.2f} s cum {r['calls']:>8} calls  {r['function']}"
                )

    # ---- targets
    print()
    print("targets (the Scale issue):")
    marks = []
    if 60000 in by_n:
        s = by_n[60000]
        marks.append(
            (
                f"n = 60000 basis+loo+score ≤ 300 s: {s['total_s']:.0f} s (loo+score phase alone "
                f"{s['loo_score_s']:.0f} s)",
                s["total_s"] <= 300,
            )
        )
        marks.append((f"n = 60000 peak memory ≤ 8 GiB: {s['peak_rss_gib']:.2f} GiB", s["peak_rss_gib"] <= 8))
    if ratio is not None:
        marks.append((f"time(60000)/time(6000) ≤ 12: {ratio:.2f}", ratio <= 12))
    if "paper_s" in p:
        sp = p["paper_s"] / p["sui_s"]
        marks.append((f"≥ 100× faster than the paper's algorithm at n = {p['n']}: {sp:.0f}× (extrapolated)", sp >= 100))
        marks.append(
            (f"F-SI equal to the paper's ≤ 1e-6 relative: {p['paper_fsi_maxrel']:.1e}", p["paper_fsi_maxrel"] <= 1e-6)
        )
    if check is not None and "skipped" not in check:
        marks.append(
            (
                f"{check['samples']}-sample check at n = {check['n']} ≤ 1e-6: F-SI {check['fsi_maxrel']:.1e}, "
                f"‖Δv‖² {check['dvsq_maxrel']:.1e}",
                max(check["fsi_maxrel"], check["dvsq_maxrel"]) <= 1e-6,
            )
        )
    for text, ok in marks:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}")
        put("targets", None, text, "met" if ok else "not met")

    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["section", "n", "metric", "value", "unit"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
