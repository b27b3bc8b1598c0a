"""Benchmark: the jacobians stage's work against the network's own cost, in the same run.

    python bench/bench_jacobians.py [--models mlp cnn resnet18] [--projections exact khatri_rao coordinates none]
                                    [--n 2000] [--n-resnet18 128] [--n-none 128] [--dim 4096]
                                    [--batch-size 64] [--device cpu|cuda]

For each model and projection, two measurements over the same n synthetic Gaussian inputs (speed does not
depend on the data), each in a fresh subprocess of this script so that its peak RSS (ru_maxrss) is its own:

- jacobians  what the stage runs: `sui_core.linearized.jacobians.extract` with the stage's store
             (`sui_core.linearized.factors.make_store`: layer factors for `exact`, else the projector)
             writing Parquet shards of `shard_rows` (the stage's default) to a temporary folder. Inside
             it, the seconds spent in the store's `shard_columns` (f0 and Φ or the factors of a batch,
             as numpy) are counted apart: the pure compute, without Parquet writing and hashing.
- fwd+bwd    one plain epoch of the same model over the same samples and batch size: model(x),
             ½·mean‖f(x) − y‖² (the training loss), .backward(); nothing per sample.

Both run in eval mode (batch norm on its running statistics, as the linearization uses it) after one
untimed warm-up batch (for jacobians: one batch through `extract`, which also pays pyarrow's import of
pandas on its first array, about 0.5 s); the store's construction and the warm-up are reported apart
(setup s): fixed costs, not throughput.
ratio = jacobians time / fwd+bwd time (the Speed issue's target: ≤ 3). Models (k = 1, seeded init, built by
`sui_core.network.models.build_model`): the default MLP 784-1024-1 and the paper's CNN on 1×28×28, and
torchvision resnet18 on 3×32×32. Projections: `exact` (every coordinate as layer factors: D = the
parameter count), `khatri_rao` and `coordinates` with dims_per_tensor the smallest p with D = Σ min(p,
numel) ≥ --dim, and `none` (the full Jacobian) for the MLP only, on --n-none samples (3.2 MB a sample).
The 1-minute load average is printed beside each row: the numbers are only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import JACOBIAN_BATCH, dims_per_tensor_for, environment_lines

MIB = 2**20
SEED = 0
# model name -> (input shape without the batch dimension, model config arguments)
MODELS = {
    "mlp": ((1, 28, 28), {"arch": "mlp", "hidden": [1024]}),
    "cnn": ((1, 28, 28), {"arch": "cnn"}),
    "resnet18": ((3, 32, 32), {"arch": "resnet18"}),
}
PROJECTIONS = ("exact", "khatri_rao", "coordinates", "none")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--projections", nargs="+", choices=PROJECTIONS, default=list(PROJECTIONS))
    p.add_argument("--n", type=int, default=2000, help="samples for the MLP and the CNN")
    p.add_argument("--n-resnet18", type=int, default=128, help="samples for resnet18")
    p.add_argument("--n-none", type=int, default=128, help="samples for projection none (MLP only)")
    p.add_argument("--dim", type=int, default=4096, help="D of khatri_rao and coordinates (the smallest ≥ dim)")
    p.add_argument("--batch-size", type=int, default=JACOBIAN_BATCH, help="jacobian.batch_size (the stage's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON of one measurement, run in this process
    return p.parse_args(argv)


def build(model_name: str, device: str):
    """The k = 1 network `model_name` at its seeded init on `device`, and its input shape."""
    from sui_core.config import ModelConfig
    from sui_core.network.models import build_model

    shape, kwargs = MODELS[model_name]
    return build_model(ModelConfig(init_seed=SEED, **kwargs), list(shape), 1).to(device), shape


def store_for(model, shape, projection: str, dim: int, batch_size: int):
    """What the jacobians stage stores for `projection` (`make_store`), p chosen for D ≈ dim; and p."""
    from sui_core.config import JacobianConfig
    from sui_core.linearized.factors import KhatriRaoProjector, factor_layout, make_store
    from sui_core.linearized.jacobians import jacobian_shapes

    per_tensor = JacobianConfig().dims_per_tensor  # unused by exact and none
    if projection == "coordinates":
        per_tensor = dims_per_tensor_for(dim, [s.numel() for s in jacobian_shapes(model).values()])
    elif projection == "khatri_rao":  # its blocks: a factor layer's weight and bias together
        blocks = KhatriRaoProjector(factor_layout(model, shape), 1, SEED).shapes
        per_tensor = dims_per_tensor_for(dim, [s.numel() for s in blocks.values()])
    cfg = JacobianConfig(projection=projection, dims_per_tensor=per_tensor, seed=SEED, batch_size=batch_size)
    return make_store(cfg, model, shape), per_tensor, cfg.shard_rows


class TimedStore:
    """The store handed to `extract`, counting the seconds of its `shard_columns` (the compute)."""

    def __init__(self, store):
        self.store, self.seconds = store, 0.0

    def shard_columns(self, model, x):
        started = time.perf_counter()
        columns = self.store.shard_columns(model, x)  # numpy on return: a GPU has finished by then
        self.seconds += time.perf_counter() - started
        return columns


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(job: dict) -> dict:
    """One measurement (job: model, projection or None for fwd+bwd, n, dim, batch_size, device)."""
    import torch

    from sui_core.linearized.jacobians import extract, input_batches

    torch.manual_seed(SEED)
    device, batch, n = job["device"], job["batch_size"], job["n"]
    model, shape = build(job["model"], device)
    x = np.random.default_rng(SEED).standard_normal((n, *shape), dtype=np.float32)
    out = {"params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    started = time.perf_counter()
    if job["projection"] is None:

        def epoch(stop: int) -> None:
            for xb in input_batches(model, x, 0, stop, batch):
                model.zero_grad(set_to_none=True)
                f = model(xb).reshape(len(xb), -1)
                (0.5 * f.square().sum(dim=1).mean()).backward()  # targets y = 0: the cost is the same
            synchronize(device)

        model.eval()
        epoch(min(batch, n))  # warm-up
        out["setup_s"] = time.perf_counter() - started
        started = time.perf_counter()
        epoch(n)
        out["seconds"] = time.perf_counter() - started
    else:
        store, out["p"], shard_rows = store_for(model, shape, job["projection"], job["dim"], batch)
        out["D"] = store.total_dim
        timed = TimedStore(store)
        with tempfile.TemporaryDirectory(prefix="bench_jacobians_") as folder:
            # warm-up: one batch through extract (khatri_rao draws U and V; pyarrow imports pandas, 0.5 s)
            extract(model, x[:batch], np.arange(min(batch, n)), store, folder, "warmup", batch, shard_rows, False)
            out["setup_s"] = time.perf_counter() - started
            started = time.perf_counter()
            entries = extract(model, x, np.arange(n), timed, folder, "train", batch, shard_rows, progress=False)
            out["seconds"] = time.perf_counter() - started
            out["shard_mib"] = sum(p.stat().st_size for p in Path(folder).glob("train-*")) / MIB
        out["compute_s"], out["shards"] = timed.seconds, len(entries)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
    out["load"] = os.getloadavg()[0]
    out["torch_threads"] = torch.get_num_threads()
    return out


def spawn(job: dict) -> dict:
    """Run one measurement in a fresh Python process; its result is the last line of its stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"error": f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args) -> list[tuple[str, str, int]]:
    """(model, projection, n) of every row: `none` only for the MLP, on --n-none samples."""
    rows = []
    for model in args.models:
        for projection in args.projections:
            if projection == "none" and model != "mlp":
                continue
            n = args.n_none if projection == "none" else args.n_resnet18 if model == "resnet18" else args.n
            rows.append((model, projection, n))
    return rows


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    print("\n".join(environment_lines()))
    print(f"device {args.device}, batch {args.batch_size}, D ≈ {args.dim}; inputs: synthetic Gaussian, k = 1\n")
    common = {"dim": args.dim, "batch_size": args.batch_size, "device": args.device}
    baselines: dict[tuple[str, int], dict] = {}
    table = [
        "| model | projection | p | D | n | jacobians samples/s | compute only samples/s | fwd+bwd samples/s "
        "| ratio | setup s | peak RSS MiB jacobians / fwd+bwd | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, projection, n in plan(args):
        if (model, n) not in baselines:
            baselines[model, n] = spawn({"model": model, "projection": None, "n": n, **common})
        base = baselines[model, n]
        jac = spawn({"model": model, "projection": projection, "n": n, **common})
        if "error" in jac or "error" in base:
            table.append(f"| {model} | {projection} | | | {n} | {jac.get('error', base.get('error'))} |||||||")
            print(table[-1], flush=True)
            continue
        row = (
            f"| {model} | {projection} | {jac['p'] if projection in ('khatri_rao', 'coordinates') else '–'} "
            f"| {jac['D']:,} | {n:,} | {n / jac['seconds']:,.0f} | {n / jac['compute_s']:,.0f} "
            f"| {n / base['seconds']:,.0f} | {jac['seconds'] / base['seconds']:.1f}× | {jac['setup_s']:.1f} "
            f"| {jac['peak_rss_mib']:,.0f} / {base['peak_rss_mib']:,.0f} | {jac['load']:.1f} |"
        )
        table.append(row)
        print(row, flush=True)
        gpu = f", GPU peak {fmt(jac.get('peak_gpu_mib'), ',.0f')} MiB" if args.device == "cuda" else ""
        print(f"    shards {jac['shards']} ({jac['shard_mib']:,.1f} MiB), params {jac['params']:,}{gpu}", flush=True)
    print("\n" + "\n".join(table))
    print(
        "\nratio = jacobians time / fwd+bwd time over the same samples (target ≤ 3×); compute only = the "
        "store's shard_columns, without Parquet writing; load = 1-minute load average at the end of the "
        "jacobians measurement"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
