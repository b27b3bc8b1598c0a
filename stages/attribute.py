"""DVC stage `attribute`: which training samples made each validation (or test) prediction — the exact change of
every target prediction when each training sample is left out (sui_core.studies.attribution), the top
proponents and opponents of each target's predicted class, a gallery, and the whole train × target
effect matrix when it is at most `attribute.matrix_limit_mb`. `sui explain <id>` prints one target.
Off by default (attribute.enabled): then it writes a small "disabled" record at once."""

import numpy as np

from stages import paths
from stages.common import Configs, StageRun, finite_numbers, stage_app
from sui_core import artifacts
from sui_core.errors import ParamError
from sui_core.io import atomic_dir, write_json

METRICS_FILE = paths.METRICS / "attribute.json"


def target_index(wanted: list[int], ids: np.ndarray, split: str = "val") -> np.ndarray:
    """Positions in the split of the ids `wanted` (all when empty); ParamError for an unknown id."""
    if not wanted:
        return np.arange(len(ids))
    position = {int(v): i for i, v in enumerate(ids)}
    missing = [i for i in wanted if i not in position]
    if missing:
        raise ParamError(
            "attribute.targets",
            f"sample ids {missing[:5]} are not in the {split} split ({len(ids)} samples; "
            f"data/prepared/{split}.parquet lists its ids)",
        )
    return np.array([position[i] for i in wanted], dtype=np.int64)


def body(cfg: Configs, run: StageRun) -> dict:
    a = cfg.attribute
    if not a.enabled:
        with atomic_dir(paths.ATTRIBUTION) as out:
            artifacts.publish(out, "attribute", {}, enabled=False)
        write_json(METRICS_FILE, {"enabled": False})
        return {}
    return _attribute(cfg, run)


def _attribute(cfg: Configs, run: StageRun) -> dict:
    # imported here: the stage is off by default, and a disabled stage should not pay for torch and matplotlib
    import pyarrow as pa
    import torch

    from sui_core import plots
    from sui_core.artifacts import check_aligned
    from sui_core.data.splits import read_split
    from sui_core.io import read_npz, write_parquet
    from sui_core.linearized.estimate import rows_in_basis
    from sui_core.linearized.jacobians import load_split
    from sui_core.linearized.ntk import Basis, val_rows_in_basis
    from sui_core.linearized.solver import Recipe
    from sui_core.network.models import load_model
    from sui_core.studies.attribution import attribute

    a = cfg.attribute
    ntk = cfg.input(paths.NTK)
    basis = Basis.load(ntk.file(paths.BASIS_FILE.name))
    residual = read_npz(ntk.file(paths.RESIDUAL_FILE.name), ["sample_id", "residual"])
    prepared = cfg.input(paths.PREPARED)
    train, explained = (read_split(prepared.file(f"{name}.parquet")) for name in ("train", a.split))
    check_aligned(residual["sample_id"], train.sample_id, paths.RESIDUAL_FILE, paths.PREPARED / "train.parquet")
    idx = target_index(a.targets, explained.sample_id, a.split)
    model = load_model(cfg.input(paths.MODEL).path)[0].eval()
    phi = None
    if basis.val_rows is None:  # a projected Φ: the rows in the basis from the checked shards
        cfg.input(paths.JACOBIANS)
        train_ids, _, phi = load_split(paths.JACOBIANS, "train")
        check_aligned(train_ids, train.sample_id, paths.JACOBIANS, paths.PREPARED / "train.parquet")
    if a.split == "test":  # not in the basis: their Jacobians at w0, against the training ones
        x_train, x_targets = torch.as_tensor(train.x), torch.as_tensor(explained.x[idx])
        rows = rows_in_basis(model, x_train, x_targets, cfg.jacobian, basis, phi)
    elif phi is not None:
        val_ids, _, phi_val = load_split(paths.JACOBIANS, "val")
        check_aligned(val_ids, explained.sample_id, paths.JACOBIANS, paths.PREPARED / "val.parquet")
        rows = val_rows_in_basis(phi, phi_val, basis)[idx]
    else:
        rows = basis.val_rows[idx]
    with torch.no_grad():
        f0 = model(torch.as_tensor(explained.x[idx])).to(torch.float64).numpy()
    n, (m, k) = len(train), f0.shape
    matrix = np.empty((n, m, k), np.float32) if 4 * n * m * k <= a.matrix_limit_mb * 2**20 else None

    def keep(start: int, effect: np.ndarray) -> None:
        if matrix is not None:
            matrix[start : start + len(effect)] = effect

    found = attribute(
        basis,
        residual["residual"],
        f0,
        rows,
        Recipe.from_config(cfg.training),
        a.top,
        cfg.loo.tol,
        on_block=keep,
    )
    names = np.asarray([str(c) for c in train.class_names])
    target_ids = explained.sample_id[idx]
    predicted_ratio = found.additivity[np.arange(m), found.predicted if k > 1 else 0]  # of the predicted class
    table = pa.table(
        {
            "target_id": target_ids,
            "label": names[explained.label[idx]],
            "predicted": names[found.predicted],
            "prediction": list(found.prediction),
            "proponent_id": list(train.sample_id[found.proponents]),
            "proponent_support": list(found.proponent_support),
            "opponent_id": list(train.sample_id[found.opponents]),
            "opponent_support": list(found.opponent_support),
            "effect_sum": list(found.effect_sum),
            "joint_effect": list(found.joint),
            "additivity": list(found.additivity),
        }
    )
    with atomic_dir(paths.ATTRIBUTION) as out:
        write_parquet(out / paths.INFLUENCES_FILE.name, table)
        if matrix is not None:
            effects = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), m * k)
            write_parquet(
                out / paths.EFFECTS_FILE.name,
                pa.table({"sample_id": train.sample_id, "effect": effects}).replace_schema_metadata(
                    {b"sui.target_ids": ",".join(map(str, target_ids)).encode(), b"sui.outputs": str(k).encode()}
                ),
            )
        if plots.is_image(list(train.input_shape)):
            shown = np.arange(min(a.gallery_targets, m))
            plots.attribution_gallery(
                explained.x[idx[shown]],
                [
                    f"target {target_ids[t]}\nlabel {names[explained.label[idx[t]]]}\npred. {names[found.predicted[t]]}"
                    for t in shown
                ],
                train.x,
                found.proponents[shown],
                found.opponents[shown],
                [[f"{train.sample_id[i]}: {names[train.label[i]]}" for i in found.proponents[t]] for t in shown],
                [[f"{train.sample_id[i]}: {names[train.label[i]]}" for i in found.opponents[t]] for t in shown],
                out / "plots" / "attribution_gallery.png",
            )
        cfg.publish(out, enabled=True, targets=int(m), outputs=int(k), matrix=matrix is not None)
    metrics = {
        "enabled": True,
        "targets": int(m),
        "matrix_stored": matrix is not None,
        "median_additivity_predicted_class": float(np.nanmedian(predicted_ratio)),
        "proponent_same_label_share": float(np.mean(train.label[found.proponents[:, 0]] == found.predicted)),
    }
    print(
        f"attribute: {m} targets × {n} training samples; Σ of the single-sample effects / removing all at once: "
        f"median {metrics['median_additivity_predicted_class']:.3f} (1 = additive)"
    )
    write_json(METRICS_FILE, metrics)
    run.log_artifact(METRICS_FILE)
    if (paths.ATTRIBUTION / "plots").is_dir():
        run.log_artifacts(paths.ATTRIBUTION / "plots", "plots")
    return finite_numbers(metrics)


app = stage_app("attribute", __doc__, body, sections=["attribute", "training", "loo", "jacobian"])

if __name__ == "__main__":
    app()
