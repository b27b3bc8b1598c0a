"""DVC stage `loo`: the exact leave-one-out weight change of every training sample (as the σ-free
quadratic forms behind F-SI and SI), and how the linearized model fits each sample (leave-one-out
loss, training loss, leverage).

It also leaves out each group of samples at once (each class, source or group: `loo.groups`), for
the unique information of a whole group.

With `compute.nproc` > 1 (or under torchrun) every rank loads the basis and solves its contiguous
range of samples; the SGD smoothing's gradient covariance is summed over the ranks' shares
(all-reduce); rank 0 gathers the forms in sample order and writes them. Everything a rank does before
that all-reduce depends only on inputs every rank shares, so an error there happens on every rank.
"""

import time

import numpy as np
import pyarrow as pa

from stages import distributed as dist
from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.data.splits import read_split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir, read_npz, write_parquet
from sui_core.linearized.jacobians import contiguous_range
from sui_core.linearized.ntk import Basis
from sui_core.linearized.scores import group_table, loo_quadratic_forms, planned_peak_bytes
from sui_core.linearized.solver import Recipe


def body(cfg: Configs, run: StageRun) -> dict:
    def load():
        ntk = cfg.input(paths.NTK)
        return (
            Basis.load(ntk.file(paths.BASIS_FILE.name)),
            read_npz(ntk.file(paths.RESIDUAL_FILE.name), ["sample_id", "residual"]),
            read_split(cfg.input(paths.PREPARED).file("train.parquet")),
        )

    basis, targets, train = dist.run_checked(load)
    if not np.array_equal(train.sample_id, targets["sample_id"]):
        raise ArtifactError(f"{paths.RESIDUAL_FILE}: samples do not match {paths.PREPARED / 'train.parquet'}")
    recipe = Recipe.from_config(cfg.training)
    n, r = basis.z.shape[0], basis.rank
    peak = planned_peak_bytes(n, basis.z.shape[1], r, cfg.loo.block_size)
    rank, world = dist.world()
    if rank == 0:
        print(
            f"loo: n = {n}, rank r = {r}, {cfg.loo.dtype}, planned peak memory {peak / 2**30:.2f} GiB"
            + (f" per process, {world} processes" if world > 1 else "")
        )
    started = time.perf_counter()
    mine = contiguous_range(n, rank, world)
    parts = dist.all_gather_checked(
        lambda: loo_quadratic_forms(
            basis,
            targets["residual"],
            recipe,
            cfg.training.batch_size,
            cfg.loo.tol,
            cfg.loo.block_size,
            cfg.loo.dtype,
            progress=rank == 0,
            samples=mine,
            all_reduce=dist.all_reduce_sum if world > 1 else None,
        )
    )
    seconds = time.perf_counter() - started
    if rank != 0:
        return {}
    result = parts[0]
    forms = {name: np.concatenate([part.forms[name] for part in parts]) for name in result.forms}
    fit = {name: np.concatenate([part.fit[name] for part in parts]) for name in result.fit}
    table = pa.table({"sample_id": targets["sample_id"], **forms, **fit})
    groups = group_table(basis, targets["residual"], train, recipe, cfg.loo.groups, forms["fsi_sum"])
    with atomic_dir(paths.LOO) as out:
        write_parquet(out / paths.FORMS_FILE.name, table)
        write_parquet(out / paths.GROUPS_FILE.name, groups)
        cfg.publish(
            out,
            plan=result.plan.as_dict(),
            full=vars(recipe.full(n)),
            left_out=vars(recipe.left_out(n)),
            n_val=basis.n_val,
            train_mse=result.train_mse,
            units="squared weights/outputs, σ-free",
        )
    return {
        "seconds": seconds,
        "matvecs_per_sample": result.plan.matvecs,
        "train_mse": result.train_mse,
        "dv_sq_mean": float(np.mean(forms["dv_sq"])),
    }


app = stage_app("loo", __doc__, body, sections=["training", "loo"], distributed=True)

if __name__ == "__main__":
    app()
