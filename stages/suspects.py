"""DVC stage `suspects`: which training labels are likely wrong, in the data as given, with no known
flips needed (sui_core.studies.suspects): every sample's suspicion, given and predicted label and flag,
the detector and threshold chosen on seeded flipped copies, a gallery of the top suspects.

With `suspects.baselines`, the real network's loss, EL2N and cleanlab are scored beside it, on the same
samples. Where the prepared data carries known flips (`data.label_noise` > 0, or the user's own flags),
they are never used for the choice, only to report how each flagged set measures against them
(`measured_*` for sui's, `<baseline>_measured_*`)."""

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
from sui_core.network.outputs import targets
from sui_core.studies.suspects import against_known, baseline_flags, suspects

METRICS_FILE = paths.METRICS / "suspects.json"


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
    baselines, issues = {}, None
    if s.baselines:
        # imported here: torch only when real networks are trained (seconds of fixed cost otherwise)
        from sui_core.network.models import load_model
        from sui_core.studies.baselines import real_network_scores

        model, info = load_model(cfg.input(paths.MODEL).path)
        baselines, issues = real_network_scores(
            model,
            info,
            train.x,
            train.label,
            train.num_classes,
            s.baselines,
            cfg.training,
            cfg.detection,
            "suspects.baselines",
        )
    flags = {"sui": columns["flagged"], **baseline_flags(baselines, issues, calibration.flagged)}
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
    for name, score in baselines.items():
        table[name] = score
        table[f"{name}_flagged"] = flags[name]
    if train.noisy.any():
        table["known_error"] = train.noisy
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
    metrics |= {f"{name}_flagged": int(flag.sum()) for name, flag in flags.items() if name != "sui"}
    known = {
        name: against_known(flag, columns["suspicion"] if name == "sui" else baselines[name], train.noisy)
        for name, flag in flags.items()
    }
    if known["sui"]:
        metrics["known_flips"] = int(train.noisy.sum())
        print(f"suspects: against the {int(train.noisy.sum())} known wrong labels (never used to choose):")
        for name, found in known.items():
            print(
                f"  {name:<9} AP {found['ap']:.3f}, flagged {int(flags[name].sum())}: precision "
                f"{found['precision']:.2f}, recall {found['recall']:.2f}"
            )
            prefix = "measured" if name == "sui" else f"{name}_measured"
            metrics |= {f"{prefix}_{key}": value for key, value in found.items()}
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


app = stage_app("suspects", __doc__, body, sections=["suspects", "training", "loo", "detection"])

if __name__ == "__main__":
    app()
