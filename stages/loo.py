"""DVC stage `loo`: the exact leave-one-out weight change of every training sample (as the σ-free quadratic forms behind F-SI and SI)."""

import time

import numpy as np
import pyarrow as pa

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.io import atomic_dir, read_npz, write_meta, write_parquet
from sui_core.ntk import Basis
from sui_core.scores import loo_quadratic_forms, planned_peak_bytes
from sui_core.solver import Recipe


def body(cfg: Configs, run: StageRun) -> dict:
    basis = Basis.load(paths.BASIS_FILE)
    targets = read_npz(paths.RESIDUAL_FILE, ["sample_id", "residual"])
    recipe = Recipe.from_config(cfg.training)
    n, r = basis.z.shape[0], basis.rank
    peak = planned_peak_bytes(n, basis.z.shape[1], r, cfg.loo.block_size)
    print(f"loo: n = {n}, rank r = {r}, {cfg.loo.dtype}, planned peak memory {peak / 2**30:.2f} GiB")
    started = time.perf_counter()
    result = loo_quadratic_forms(basis, targets["residual"], recipe, cfg.training.batch_size,
                                 cfg.loo.tol, cfg.loo.block_size, cfg.loo.dtype)
    seconds = time.perf_counter() - started
    table = pa.table({"sample_id": targets["sample_id"], **result.forms})
    with atomic_dir(paths.LOO) as out:
        write_parquet(out / paths.FORMS_FILE.name, table)
        write_meta(out, "loo", cfg.record(),
                   plan=result.plan.as_dict(), full=vars(recipe.full(n)), left_out=vars(recipe.left_out(n)),
                   n_val=basis.n_val, train_mse=result.train_mse, units="squared weights/outputs, σ-free")
    return {"seconds": seconds, "matvecs_per_sample": result.plan.matvecs, "train_mse": result.train_mse,
            "dv_sq_mean": float(np.mean(result.forms["dv_sq"]))}


app = stage_app("loo", __doc__, body, sections=["training", "loo"])

if __name__ == "__main__":
    app()
