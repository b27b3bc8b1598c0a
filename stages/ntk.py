"""DVC stage `ntk`: the eigenbasis of ΦᵀΦ (or of the kernel ΦΦᵀ, whichever is smaller) and F-SI's metric."""

import numpy as np

from stages import paths
from stages.common import Configs, StageRun, stage_app
from stages.jacobians import data_sha256
from sui_core.data.splits import read_split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir, write_npz
from sui_core.linearized.jacobians import iter_shards, read_manifest
from sui_core.linearized.ntk import build_basis, choose_space, planned_peak_bytes
from sui_core.network.models import targets


def body(cfg: Configs, run: StageRun) -> dict:
    train = read_split(cfg.input(paths.PREPARED).file("train.parquet"))
    manifest = read_manifest(cfg.input(paths.JACOBIANS).path)
    if manifest.get("data_sha256") != data_sha256():
        raise ArtifactError(
            f"{paths.JACOBIANS}/manifest.json: made from other prepared data than "
            f"{paths.PREPARED}; rerun the jacobians stage (dvc repro)"
        )
    sample_id, f0 = [], []
    for ids, f0_block, _ in iter_shards(paths.JACOBIANS, "train"):
        sample_id.append(ids)
        f0.append(f0_block)
    sample_id, f0 = np.concatenate(sample_id), np.concatenate(f0)
    if not np.array_equal(sample_id, train.sample_id):
        raise ArtifactError(
            f"{paths.JACOBIANS}: training shards do not hold the samples of {paths.PREPARED / 'train.parquet'} in order"
        )
    n, k, dim = len(sample_id), manifest["k"], manifest["D"]
    shard_rows = max(entry["rows"] for entry in manifest["shards"]["train"])
    print(
        f"ntk: n = {n}, k = {k}, D = {dim}: {choose_space(n, k, dim)} space, rank ≤ {min(n * k, dim)}, "
        f"planned peak memory {planned_peak_bytes(n, k, dim, shard_rows) / 2**30:.2f} GiB"
    )
    basis = build_basis(
        lambda: (phi for _, _, phi in iter_shards(paths.JACOBIANS, "train")),
        lambda: (phi for _, _, phi in iter_shards(paths.JACOBIANS, "val")),
        n,
        k,
        dim,
    )
    residual = targets(train.label, train.num_classes) - f0
    with atomic_dir(paths.NTK) as out:
        basis.save(out / paths.BASIS_FILE.name)
        write_npz(out / paths.RESIDUAL_FILE.name, sample_id=sample_id, residual=residual)
        cfg.publish(
            out,
            space=basis.space,
            rank=basis.rank,
            n=n,
            k=k,
            D=dim,
            n_val=basis.n_val,
            projection=manifest["projection"],
            data_sha256=manifest["data_sha256"],
        )
    run.set_tags({"space": basis.space})
    return {"rank": basis.rank, "eig_max": float(basis.s[0]), "eig_min": float(basis.s[-1]), "n_val": basis.n_val}


app = stage_app("ntk", __doc__, body, sections=[])

if __name__ == "__main__":
    app()
