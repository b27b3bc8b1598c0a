"""DVC stage `jacobians`: projected per-sample Jacobians of the outputs at w0, and f0, as Parquet shards.

`jacobian.projection: exact` stores every coordinate as layer factors instead (sui_core.linearized.factors):
the same shards, manifest and checks, other columns.

With `compute.nproc` > 1 (or under torchrun) each rank computes a contiguous run of the batches one
process would compute and writes them as its own shard files into one shared temporary folder; rank 0
writes the manifest (the ranks' shard entries in sample order) and renames the folder into place.
"""

import torch

from stages import distributed as dist
from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.data.splits import read_split
from sui_core.linearized.factors import make_store
from sui_core.linearized.jacobians import SPLITS, extract, write_manifest
from sui_core.network.models import load_model


def body(cfg: Configs, run: StageRun) -> dict:
    rank, world = dist.world()

    def load():
        torch.manual_seed(cfg.jacobian.seed)
        model, info = load_model(cfg.input(paths.MODEL).path)
        return model, info, make_store(cfg.jacobian, model, info["input_shape"]), cfg.input(paths.PREPARED)

    model, info, store, prepared = dist.run_checked(load)  # an error on any rank stops every rank
    if rank == 0:
        print(f"jacobians: projection {cfg.jacobian.projection}, D = {store.total_dim}, k = {info['num_outputs']}")
    with dist.shared_atomic_dir(paths.JACOBIANS) as out:

        def my_shards() -> dict[str, list[dict]]:
            jac, mine, where = cfg.jacobian, {}, {"progress": rank == 0, "rank": rank, "world": world}
            for split in SPLITS:
                data = read_split(prepared.file(f"{split}.parquet"))
                mine[split] = extract(
                    model, data.x, data.sample_id, store, out, split, jac.batch_size, jac.shard_rows, **where
                )
            return mine

        parts = dist.all_gather_checked(my_shards)  # every rank has written its files
        if rank != 0:
            return {}
        shards = {split: [entry for part in parts for entry in part[split]] for split in SPLITS}
        data_sha256 = prepared.digest(*(f"{split}.parquet" for split in SPLITS))  # the ntk stage checks it
        write_manifest(out, store, info["num_outputs"], shards, info["sha256"], data_sha256)
        cfg.publish(out)
    run.log_artifact(paths.JACOBIANS / "manifest.json")
    rows = {f"n_{split}": sum(e["rows"] for e in shards[split]) for split in SPLITS}
    return {"D": store.total_dim, "k": info["num_outputs"], **rows}


app = stage_app("jacobians", __doc__, body, sections=["jacobian"], distributed=True)

if __name__ == "__main__":
    app()
