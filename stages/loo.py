"""DVC stage `loo`: the exact leave-one-out weight change of every training sample (as the σ-free
quadratic forms behind F-SI and SI), and how the linearized model fits each sample (leave-one-out
loss, training loss, leverage).

It also leaves out each group of samples at once (each class, source or group: `loo.groups`), for
the unique information of a whole group.

With `loo.estimator: trained` the F-SI forms and the fit are those of the real training run instead
(one reverse pass through it, sui_core.network.trajectory); that runs in one process.

With `compute.nproc` > 1 (or under torchrun) every rank loads the basis and solves its contiguous
range of samples; the SGD smoothing's gradient covariance is summed over the ranks' shares
(all-reduce); rank 0 gathers the forms in sample order and writes them. Everything a rank does before
that all-reduce depends only on inputs every rank shares, so an error there happens on every rank.
"""

import sys
import time
from dataclasses import replace

import numpy as np

from stages import distributed as dist
from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.artifacts import Output, check_aligned
from sui_core.data.splits import Split, read_split
from sui_core.errors import ParamError
from sui_core.io import atomic_dir, read_npz, write_parquet
from sui_core.linearized.ntk import Basis
from sui_core.linearized.rows import contiguous_range
from sui_core.linearized.scores import LooResult, forms_table, group_table, loo_quadratic_forms, planned_peak_bytes
from sui_core.linearized.solver import Recipe


def along_real_run(
    cfg: Configs, basis: Basis, residual: np.ndarray, prepared: Output, train: Split, result: LooResult
) -> tuple:
    """loo.estimator trained: F-SI and the fit of the real training run (sui_core.linearized.estimate.
    trained_estimate) in place of the linearized ones; the SI forms and groups stay linearized."""
    # imported here: torch only for this estimator (seconds of fixed cost the linearized default skips)
    import torch

    from sui_core.linearized.estimate import trained_estimate
    from sui_core.linearized.jacobians import load_split
    from sui_core.linearized.ntk import val_rows_in_basis
    from sui_core.network.models import load_model
    from sui_core.network.outputs import targets

    steps = cfg.training.whole_steps("loo.estimator trained")
    val = read_split(prepared.file("val.parquet"))
    model = load_model(cfg.input(paths.MODEL).path)[0]
    val_rows = basis.val_rows
    if val_rows is None:  # a projected Φ: the validation rows in the basis from the checked shards
        cfg.input(paths.JACOBIANS)
        val_rows = val_rows_in_basis(*(load_split(paths.JACOBIANS, split)[2] for split in ("train", "val")), basis)
    y = targets(train.label, train.num_classes)
    x, x_val = (torch.as_tensor(split.x) for split in (train, val))
    recipe = Recipe.from_config(cfg.training)
    est = trained_estimate(
        model,
        x,
        y,
        x_val,
        recipe,
        steps,
        basis,
        val_rows,
        residual,
        result.forms,
        result.fit,
        cfg.loo.directions,
        cfg.loo.tol,
        progress="loo along the real run",
        check=cfg.loo.check_samples,
    )
    print(
        f"loo: trained: {est.directions} output directions ({est.captured:.1%} of the linearized F-SI), "
        f"reverse pass through {steps} steps in {est.seconds:.1f} s"
    )
    record = {"directions": est.directions, "captured": est.captured, "real_train_mse": est.train_mse}
    if est.check is not None:
        record["check"] = est.check.record(train.sample_id)
        ratios = ", ".join(f"{r:.2f}" for r in est.check.ratios())
        print(f"loo: trained: F-SI / real retraining without the {len(est.check.samples)} top samples: {ratios}")
        if not est.check.agrees():
            print(
                "loo: warning: the trained estimate is off by more than 1.5x from really retraining without "
                "a top sample: this run does not respond linearly to one sample's weight (a long run, or "
                "memorized samples); rank with care, and measure with the validate stage",
                file=sys.stderr,
            )
    return replace(result, forms=est.forms, fit=est.fit, train_mse=est.train_mse), record, est.seconds


def body(cfg: Configs, run: StageRun) -> dict:
    def load():
        ntk = cfg.input(paths.NTK)
        basis = Basis.load(ntk.file(paths.BASIS_FILE.name))
        targets = read_npz(ntk.file(paths.RESIDUAL_FILE.name), ["sample_id", "residual"])
        prepared = cfg.input(paths.PREPARED)
        inputs = cfg.loo.estimator == "trained"  # the images only for the real run
        return basis, targets, prepared, read_split(prepared.file("train.parquet"), inputs=inputs)

    basis, targets, prepared, train = dist.run_checked(load)
    check_aligned(targets["sample_id"], train.sample_id, paths.RESIDUAL_FILE, paths.PREPARED / "train.parquet")
    recipe, loo, (rank, world) = Recipe.from_config(cfg.training), cfg.loo, dist.world()
    if loo.estimator == "trained" and world > 1:
        raise ParamError("compute.nproc", "loo.estimator trained runs in one process: set compute.nproc: 1")
    n, r = basis.z.shape[0], basis.rank
    if rank == 0:
        peak = planned_peak_bytes(n, basis.z.shape[1], r, loo.block_size) / 2**30
        many = f" per process, {world} processes" if world > 1 else ""
        print(f"loo: n = {n}, rank r = {r}, {loo.dtype}, planned peak memory {peak:.2f} GiB{many}")
    started = time.perf_counter()
    share = {"samples": contiguous_range(n, rank, world), "all_reduce": dist.all_reduce_sum if world > 1 else None}
    solve = (basis, targets["residual"], recipe, cfg.training.batch_size, loo.tol, loo.block_size, loo.dtype)
    parts = dist.all_gather_checked(lambda: loo_quadratic_forms(*solve, progress=rank == 0, **share))
    seconds = time.perf_counter() - started
    if rank != 0:
        return {}
    result, record, metrics = parts[0], parts[0].record(recipe, n, basis.n_val), {}
    if loo.estimator == "trained":
        result, record["trained"], metrics["trained_seconds"] = along_real_run(
            cfg, basis, targets["residual"], prepared, train, result
        )
    table = forms_table(parts if world > 1 else [result], targets["sample_id"])
    groups = group_table(basis, targets["residual"], train, recipe, loo.groups, table.column("fsi_sum").to_numpy())
    with atomic_dir(paths.LOO) as out:
        write_parquet(out / paths.FORMS_FILE.name, table)
        write_parquet(out / paths.GROUPS_FILE.name, groups)
        cfg.publish(out, **record)  # record["trained"]: only for loo.estimator trained
    metrics |= {"seconds": seconds, "matvecs_per_sample": result.plan.matvecs, "train_mse": result.train_mse}
    return metrics | {"dv_sq_mean": float(np.mean(table.column("dv_sq").to_numpy()))}


app = stage_app("loo", __doc__, body, sections=["training", "loo"], distributed=True)

if __name__ == "__main__":
    app()
