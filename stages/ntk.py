"""DVC stage `ntk`: the eigenbasis of ΦᵀΦ (or of the kernel ΦΦᵀ, whichever is smaller) and F-SI's metric."""

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.artifacts import check_aligned
from sui_core.data.splits import read_split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir, write_npz
from sui_core.linearized.jacobians import SPLITS, iter_shards, outputs_at_w0, read_manifest
from sui_core.linearized.ntk import build_basis, choose_space, planned_peak_bytes
from sui_core.network.models import targets


def body(cfg: Configs, run: StageRun) -> dict:
    prepared, jacobians = cfg.input(paths.PREPARED), cfg.input(paths.JACOBIANS)
    train = read_split(prepared.file("train.parquet"))
    manifest = read_manifest(jacobians.path)
    if manifest.get("data_sha256") != prepared.digest("train.parquet", "val.parquet"):
        raise ArtifactError(
            f"{paths.JACOBIANS}/manifest.json: made from other prepared data than {paths.PREPARED}; "
            f"rerun the jacobians stage (dvc repro)"
        )
    sample_id, f0 = outputs_at_w0(paths.JACOBIANS, "train")
    check_aligned(sample_id, train.sample_id, f"{paths.JACOBIANS} (training shards)", paths.PREPARED / "train.parquet")
    n, k, dim = len(sample_id), manifest["k"], manifest["D"]
    shard_rows = max(entry["rows"] for entry in manifest["shards"]["train"])
    peak = planned_peak_bytes(n, k, dim, shard_rows) / 2**30
    print(
        f"ntk: n = {n}, k = {k}, D = {dim}: {choose_space(n, k, dim)} space, rank ≤ {min(n * k, dim)}, "
        f"planned peak memory {peak:.2f} GiB"
    )
    phi = {split: lambda split=split: (p for _, _, p in iter_shards(paths.JACOBIANS, split)) for split in SPLITS}
    basis = build_basis(phi["train"], phi["val"], n, k, dim)
    with atomic_dir(paths.NTK) as out:
        basis.save(out / paths.BASIS_FILE.name)
        residual = targets(train.label, train.num_classes) - f0
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
