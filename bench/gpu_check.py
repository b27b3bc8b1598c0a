"""GPU check: sui's jacobians, ntk and loo with the network on a CUDA device, against the CPU path, timed.

    bash bench/gpu_check.sh                                # on a CUDA machine: sets up Python, runs this
    python bench/gpu_check.py --device cpu --small         # smoke test without a GPU (tiny n, batch 16)
    python bench/gpu_check.py --cases mlp:coordinates --n-mlp 20000

Per case (model : projection, default all four: the MLP 784-1024-1 and resnet18 on 3×32×32, each with
`coordinates` and `khatri_rao` at D ≈ --dim, k = 1, seeded init):

1. full n (--n-mlp 60,000, --n-resnet18 5,000; validation --n-val 1,000, --n-val-resnet18 200) on
   --device: `jacobians.extract` of the training and validation samples (the jacobians stage's call,
   Parquet shards and manifest in a temporary folder) with the model on the device, then
   `ntk.build_basis` from the shards and `scores.loo_quadratic_forms` (float64) + `scores_from_forms` —
   wall time of each. sui's ntk and loo are numpy: they run on the CPU whatever the device (there is no
   GPU path in sui_core.linearized.ntk / scores), so only the jacobians use it.
2. comparison at --n-ref (CPU-comparable): the same solve on the first n_ref rows of the device's
   shards and on shards extracted with the model on the CPU (`--ref-batch-size`, default the same
   batches); the scores (F-SI, SI isotropic / Hessian / SGD) must agree within --rtol (1e-6) relative,
   elementwise. Φ's and f0's normwise differences are printed beside them (float32 rounding).

TF32 is turned off on the device (cuBLAS and cuDNN), else float32 products round to 10 bits.
Data: the MLP uses Fashion-MNIST (/usr/share/datasets/fashion-mnist, all 10 classes, label = class < 5,
a seeded permutation; validation: t10k) when the IDX files are there, else synthetic Gaussian inputs
with random labels, and says which; resnet18 always uses synthetic 3×32×32 inputs. The recipe is the
pipeline's (lr 0.01, t = 2000, discrete), lr halved until discrete GD is stable (`common.stable_lr`).
Exit status 1 when a comparison fails, 2 when --device cuda has no CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_jacobians import build, store_for
from bench_scale import FASHION_ROOT, fashion
from common import JACOBIAN_BATCH, environment_lines, max_rel, stable_lr

CASES = ("mlp:coordinates", "mlp:khatri_rao", "resnet18:khatri_rao", "resnet18:coordinates")
SCORES = ("fsi", "si_isotropic", "si_hessian", "si_sgd")
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the full-n jacobians run")
    p.add_argument(
        "--small", action="store_true", help="smoke test: n 512 / 64, n_ref 256 / 32, n_val 100 / 16, batch 16"
    )
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--n-mlp", type=int, default=60000)
    p.add_argument("--n-resnet18", type=int, default=5000)
    p.add_argument("--n-ref-mlp", type=int, default=2000, help="samples of the CPU comparison, MLP")
    p.add_argument("--n-ref-resnet18", type=int, default=256, help="samples of the CPU comparison, resnet18")
    p.add_argument("--n-val", type=int, default=1000, help="validation samples, MLP")
    p.add_argument("--n-val-resnet18", type=int, default=200, help="validation samples, resnet18 (also on the CPU)")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=None, help=f"jacobian.batch_size (default {JACOBIAN_BATCH})")
    p.add_argument("--ref-batch-size", type=int, default=None, help="batch of the CPU reference (default: the same)")
    p.add_argument("--rtol", type=float, default=1e-6, help="scores' largest relative difference allowed")
    args = p.parse_args(argv)
    if args.small:
        args.n_mlp, args.n_resnet18, args.n_ref_mlp, args.n_ref_resnet18 = 512, 64, 256, 32
        args.n_val, args.n_val_resnet18 = 100, 16
    args.batch_size = args.batch_size or (16 if args.small else JACOBIAN_BATCH)
    args.ref_batch_size = args.ref_batch_size or args.batch_size
    return args


def data(model_name: str, shape, n: int, n_val: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Training inputs (n, *shape) float32, their binary labels, validation inputs, and what they are."""
    rng = np.random.default_rng(SEED)
    if model_name == "mlp" and (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file():
        x, y = fashion("train")
        x_val, _ = fashion("t10k")
        if n > len(x):
            raise SystemExit(f"n = {n} but Fashion-MNIST has {len(x)} training images")
        idx = rng.permutation(len(x))[:n]
        return x[idx], (y[idx] < 5).astype(np.int64), x_val[:n_val], "Fashion-MNIST, label = class < 5"
    x = rng.standard_normal((n + n_val, *shape), dtype=np.float32)
    why = "" if model_name != "mlp" else f" ({FASHION_ROOT} not found)"
    return x[:n], rng.integers(0, 2, n), x[n:], f"synthetic Gaussian, random labels{why}"


def extract_splits(model, store, x, x_val, folder: Path, batch: int, shard_rows: int) -> float:
    """Seconds of the jacobians stage's work: `extract` of the training and validation samples, and the
    manifest (no model or data hashes: nothing checks them here)."""
    from sui_core.linearized.jacobians import extract, write_manifest

    started = time.perf_counter()
    shards = {
        split: extract(model, inputs, np.arange(len(inputs)), store, folder, split, batch, shard_rows, progress=False)
        for split, inputs in (("train", x), ("val", x_val))
    }
    write_manifest(folder, store, 1, shards, "", "")
    return time.perf_counter() - started


def first_rows(folder: Path, split: str, stop: int | None):
    """A fresh iterator of the Φ blocks of `split`'s first `stop` samples (all with None), on each call."""
    from sui_core.linearized.jacobians import iter_shards

    def chunks():
        seen = 0
        for _, _, phi in iter_shards(folder, split):
            if stop is not None and seen >= stop:
                return
            yield phi if stop is None else phi[: stop - seen]
            seen += len(phi)

    return chunks


def solve(folder: Path, labels: np.ndarray, dim: int, lr: float | None = None) -> dict:
    """ntk (build_basis from the shards) and loo + scores on the first len(labels) training samples.

    lr None: the pipeline's, halved until stable on this basis (the comparison passes the reference's)."""
    from sui_core.config import LooConfig, TrainingConfig
    from sui_core.linearized.jacobians import outputs_at_w0
    from sui_core.linearized.ntk import build_basis
    from sui_core.linearized.scores import loo_quadratic_forms, scores_from_forms
    from sui_core.linearized.solver import Recipe
    from sui_core.network.outputs import targets

    n, training, loo = len(labels), TrainingConfig(), LooConfig()
    started = time.perf_counter()
    basis = build_basis(first_rows(folder, "train", n), first_rows(folder, "val", None), n, 1, dim)
    ntk_s = time.perf_counter() - started
    note = ""
    if lr is None:
        lr, note = stable_lr(training.lr, training.weight_decay, training.dynamics, float(basis.s[0]), n)
    recipe = Recipe(lr, training.weight_decay, training.t, training.dynamics)
    residual = targets(labels, 2) - outputs_at_w0(folder, "train")[1][:n]
    started = time.perf_counter()
    result = loo_quadratic_forms(basis, residual, recipe, None, loo.tol, loo.block_size, "float64", progress=False)
    scores = scores_from_forms(result.forms, basis.n_val, 1.0, recipe.lr, n)
    loo_s = time.perf_counter() - started
    return {"ntk_s": ntk_s, "loo_s": loo_s, "scores": scores, "lr": lr, "note": note, "rank": basis.rank}


def phi_difference(folder: Path, reference: Path, n: int) -> tuple[float, float]:
    """Normwise relative differences of Φ and of f0 over the first n training samples."""
    from sui_core.linearized.jacobians import outputs_at_w0

    phi, phi_ref = (np.concatenate(list(first_rows(f, "train", n)())).astype(np.float64) for f in (folder, reference))
    f0, f0_ref = (outputs_at_w0(f, "train")[1][:n] for f in (folder, reference))
    return float(np.linalg.norm(phi - phi_ref) / np.linalg.norm(phi_ref)), float(
        np.linalg.norm(f0 - f0_ref) / np.linalg.norm(f0_ref)
    )


def check_case(args, case: str, work: Path) -> tuple[str, str, bool]:
    """Run one case; returns its timing row, its comparison row, and whether the comparison passed."""
    import torch

    model_name, projection = case.split(":")
    mlp = model_name == "mlp"
    n, n_ref = (args.n_mlp, args.n_ref_mlp) if mlp else (args.n_resnet18, args.n_ref_resnet18)
    n_ref = min(n_ref, n)
    model, shape = build(model_name, args.device)
    x, labels, x_val, source = data(model_name, shape, n, args.n_val if mlp else args.n_val_resnet18)
    print(f"{case}: n = {n:,}, n_val = {len(x_val):,}, {source}", flush=True)
    store, per_tensor, shard_rows = store_for(model, shape, projection, args.dim, args.batch_size)
    # untimed warm-up (CUDA context, kernels, khatri_rao's U and V, pyarrow's first import of pandas)
    warmup = work / f"{model_name}-{projection}-warmup"
    extract_splits(model, store, x[: args.batch_size], x_val[:1], warmup, args.batch_size, shard_rows)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    folder, reference = work / f"{model_name}-{projection}", work / f"{model_name}-{projection}-cpu"
    jac_s = extract_splits(model, store, x, x_val, folder, args.batch_size, shard_rows)
    gpu_mib = f"{torch.cuda.max_memory_allocated() / 2**20:,.0f}" if args.device == "cuda" else "–"
    full = solve(folder, labels, store.total_dim)
    print(
        f"  {args.device}: jacobians {jac_s:.1f} s, ntk {full['ntk_s']:.1f} s, loo+score {full['loo_s']:.1f} s"
        f"{'; ' + full['note'] if full['note'] else ''}",
        flush=True,
    )

    cpu_model, _ = build(model_name, "cpu")
    cpu_store, _, _ = store_for(cpu_model, shape, projection, args.dim, args.ref_batch_size)
    cpu_s = extract_splits(cpu_model, cpu_store, x[:n_ref], x_val, reference, args.ref_batch_size, shard_rows)
    ref = solve(reference, labels[:n_ref], store.total_dim)
    mine = solve(folder, labels[:n_ref], store.total_dim, lr=ref["lr"])
    rel = {name: max_rel(mine["scores"][name], ref["scores"][name]) for name in SCORES}
    phi_rel, f0_rel = phi_difference(folder, reference, n_ref)
    passed = max(rel.values()) <= args.rtol
    n_all, n_ref_all = n + len(x_val), n_ref + len(x_val)
    timing = (
        f"| {case} | {per_tensor} | {store.total_dim:,} | {n:,} | {jac_s:.1f} ({n_all / jac_s:,.0f}/s) "
        f"| {cpu_s:.1f} ({n_ref_all / cpu_s:,.0f}/s) | {full['ntk_s']:.1f} | {full['loo_s']:.1f} | {full['rank']:,} "
        f"| {gpu_mib} | {os.getloadavg()[0]:.1f} |"
    )
    comparison = (
        f"| {case} | {n_ref:,} | {phi_rel:.1e} | {f0_rel:.1e} | "
        + " | ".join(f"{rel[name]:.1e}" for name in SCORES)
        + f" | {'pass' if passed else 'FAIL'} |"
    )
    return timing, comparison, passed


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(
                f"gpu_check: error: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is "
                f"False; built for CUDA {torch.version.cuda}); run with --device cpu for the smoke test",
                file=sys.stderr,
            )
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 products in float32, not TF32
        torch.backends.cudnn.allow_tf32 = False
        device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        device = f"cpu, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print("\n".join(environment_lines()))
    print(f"device: {device}; batch {args.batch_size} (CPU reference {args.ref_batch_size}), D ≈ {args.dim}\n")
    started = time.perf_counter()
    timings, comparisons, failed = [], [], []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for case in args.cases:
            timing, comparison, passed = check_case(args, case, Path(work))
            timings.append(timing)
            comparisons.append(comparison)
            if not passed:
                failed.append(case)
    where = args.device
    print(
        f"\n| case | p | D | n | jacobians s on {where} (samples/s, train + val) | jacobians s on cpu at n_ref "
        f"| ntk s (cpu) | loo+score s (cpu) | rank | peak GPU MiB | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(timings))
    print(
        f"\n| case | n_ref | Φ rel diff | f0 rel diff | {' | '.join(SCORES)} (max rel, {where} vs cpu) | "
        f"≤ {args.rtol:g} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(comparisons))
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all passed"
    print(f"\ngpu_check: {time.perf_counter() - started:.0f} s in all; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
