"""DVC stage `suspects`: which training labels are likely wrong, in the data as given, with no known
flips needed (sui_core.studies.suspects): every sample's suspicion, given and predicted label and flag,
the detector and threshold chosen on seeded flipped copies, a gallery of the top suspects.

Where the prepared data carries known flips (`data.label_noise` > 0, or the user's own flags), they are
never used for the choice, only to report how the flagged set measures against them (`measured_*`)."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from stages import paths
from stages.common import Configs, StageRun, finite_numbers, stage_app
from sui_core import plots
from sui_core.artifacts import check_aligned
from sui_core.data.splits import read_split
from sui_core.io import atomic_dir, read_npz, write_json, write_parquet
from sui_core.linearized.ntk import Basis
from sui_core.linearized.solver import Recipe
from sui_core.network.models import targets
from sui_core.studies.evaluation import detection_metrics
from sui_core.studies.suspects import suspects

METRICS_FILE = paths.METRICS / "suspects.json"


def measured(flagged: np.ndarray, suspicion: np.ndarray, noisy: np.ndarray) -> dict:
    """The flagged set and the ranking against known flips (reported only, never used to choose)."""
    if not noisy.any() or noisy.all():
        return {}
    found = detection_metrics(suspicion, noisy, [])
    return {
        "measured_ap": found["ap"],
        "measured_auroc": found["auroc"],
        "measured_precision": float(noisy[flagged].mean()) if flagged.any() else float("nan"),
        "measured_recall": float(noisy[flagged].sum() / noisy.sum()),
        "known_flips": int(noisy.sum()),
    }


def body(cfg: Configs, run: StageRun) -> dict:
    ntk = cfg.input(paths.NTK)
    basis = Basis.load(ntk.file(paths.BASIS_FILE.name))
    residual = read_npz(ntk.file(paths.RESIDUAL_FILE.name), ["sample_id", "residual"])
    train = read_split(cfg.input(paths.PREPARED).file("train.parquet"))
    check_aligned(residual["sample_id"], train.sample_id, paths.RESIDUAL_FILE, paths.PREPARED / "train.parquet")
    f0 = targets(train.label, train.num_classes) - residual["residual"]
    s = cfg.suspects
    columns, calibration = suspects(
        basis,
        f0,
        train.label,
        train.num_classes,
        Recipe.from_config(cfg.training),
        s.flips,
        s.seeds,
        s.flip_fraction,
        s.precision,
        cfg.loo.tol,
    )
    order = np.argsort(-columns["suspicion"], kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    names = np.asarray([str(c) for c in train.class_names])
    table = {
        "sample_id": train.sample_id,
        "rank": rank,
        "suspicion": columns["suspicion"],
        "label": names[train.label],
        "predicted": names[columns["predicted"]],
        "flagged": columns["flagged"],
    }
    if train.text is not None:
        table["text"] = train.text
    table = pa.table(table).take(pa.array(order))
    record = calibration.record()
    print(
        f"suspects: detector {calibration.chosen} (chosen on {len(calibration.copies)} flipped copies, "
        f"stability {calibration.stability:.2f}); estimated share of wrong labels "
        f"{calibration.estimated_error_rate:.3f}"
    )
    print(
        f"suspects: {calibration.flagged} flagged at estimated precision {calibration.estimated_precision:.2f} "
        f"(target {s.precision}), estimated recall {calibration.estimated_recall:.2f}"
    )
    metrics = {key: value for key, value in record.items() if key not in ("copies", "mean_ap", "threshold")}
    metrics |= {f"copies_ap_{name}": value for name, value in record["mean_ap"].items()}
    metrics |= measured(columns["flagged"], columns["suspicion"], train.noisy)
    with atomic_dir(paths.SUSPECTS) as out:
        write_parquet(out / paths.SUSPECTS_FILE.name, table)
        pacsv.write_csv(table, out / "suspects.csv")
        if plots.is_image(list(train.input_shape)):
            plots.suspects_gallery(
                train.x,
                order,
                names[train.label],
                names[columns["predicted"]],
                columns["flagged"],
                out / "plots" / "suspects_gallery.png",
                s.gallery_size,
            )
        cfg.publish(out, calibration=record)
    write_json(METRICS_FILE, metrics)
    run.set_tags({"suspects_detector": calibration.chosen})
    run.log_artifact(METRICS_FILE)
    run.log_artifact(paths.SUSPECTS / "suspects.csv")
    if (paths.SUSPECTS / "plots").is_dir():
        run.log_artifacts(paths.SUSPECTS / "plots", "plots")
    return finite_numbers(metrics)


app = stage_app("suspects", __doc__, body, sections=["suspects", "training", "loo"])

if __name__ == "__main__":
    app()
