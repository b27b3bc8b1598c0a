"""DVC stage `ntk`: the eigenbasis of ΦᵀΦ (or of the kernel ΦΦᵀ, whichever is smaller) and F-SI's metric.

For `jacobian.projection: exact` the shards hold layer factors: the kernel K = Θ(train, train) and
Θ(val, train) are built from them (sui_core.linearized.factors) and the basis is the kernel space's,
with the validation rows W kept in basis.npz (there is no Φ_val on disk to give them later).
"""

from stages import paths
from stages import plan as planning
from stages.common import Configs, StageRun, stage_app
from sui_core.artifacts import check_aligned
from sui_core.data.splits import read_split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir, write_npz
from sui_core.linearized.factors import KIND, iter_factor_shards, kernel, load_factors, values_per_sample
from sui_core.linearized.jacobians import SPLITS, iter_shards, outputs_at_w0, read_manifest
from sui_core.linearized.ntk import (
    basis_from_kernels,
    build_basis,
    check_kernel_fits,
    choose_space,
    planned_kernel_peak_bytes,
    planned_peak_bytes,
)
from sui_core.network.outputs import targets


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
    rows = {split: [entry["rows"] for entry in manifest["shards"][split]] for split in SPLITS}
    if manifest["projection"]["kind"] == KIND:
        n_val, values = sum(rows["val"]), values_per_sample(manifest["projection"])
        peak = planned_kernel_peak_bytes(n, k, n_val, max(rows["val"], default=0), values)
        check_kernel_fits(n, k, peak, planning.available_memory())  # before anything big is allocated
        print(f"ntk: n = {n}, k = {k}, D = {dim}: exact kernel from layer factors, planned peak {peak / 2**30:.2f} GiB")
        _, factors = load_factors(paths.JACOBIANS, "train")
        cross = (kernel(val, factors) for _, val in iter_factor_shards(paths.JACOBIANS, "val"))
        basis = basis_from_kernels(kernel(factors, factors), cross, n, k, n_val, dim)
    else:
        peak = planned_peak_bytes(n, k, dim, max(rows["train"])) / 2**30
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
