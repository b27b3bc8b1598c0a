"""DVC stage `validate`: sui's estimates and influence functions against really retraining the network
without each of m sampled training samples (the paper's Table 1), and the linear datamodeling score over
random training subsets. Off by default (validate.enabled):
then it writes a small "disabled" record at once."""

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core import artifacts
from sui_core.io import atomic_dir, write_json

METRICS_FILE = paths.METRICS / "validate.json"


def body(cfg: Configs, run: StageRun) -> dict:
    if not cfg.validate.enabled:
        with atomic_dir(paths.VALIDATE) as out:
            artifacts.publish(out, "validate", {}, enabled=False)
        write_json(METRICS_FILE, {"enabled": False})
        return {}
    return _validate(cfg, run)


def _validate(cfg: Configs, run: StageRun) -> dict:
    # imported here: the stage is off by default, and a disabled stage should not pay for torch and matplotlib
    from sui_core.data.splits import read_split
    from sui_core.io import read_parquet
    from sui_core.network.models import load_model
    from sui_core.studies import datamodels
    from sui_core.studies.validation import changes_from_forms, validate_splits, write_report

    prepared = cfg.input(paths.PREPARED)
    train, val = (read_split(prepared.file(f"{name}.parquet")) for name in ("train", "val"))
    result = validate_splits(load_model(cfg.input(paths.MODEL).path)[0], train, val, cfg.training, cfg.validate)
    estimates = dict(result.estimates)
    forms = read_parquet(cfg.input(paths.LOO).file(paths.FORMS_FILE.name), ["sample_id", "fsi_sum", "dv_sq"])
    estimates["sui_pipeline"] = changes_from_forms(forms.to_pydict(), train.sample_id[result.left_out])
    truth = result.truth
    with atomic_dir(paths.VALIDATE) as out:
        rows, metrics = write_report(
            truth, estimates, train.sample_id[result.left_out], train.noisy[result.left_out], out
        )
        if result.datamodels is not None:
            metrics.update(datamodels.write_report(result.datamodels, train.sample_id, val.sample_id, out))
        cfg.publish(
            out,
            enabled=True,
            n=len(train),
            n_val=len(val),
            checkpoint_step=result.checkpoint_step,
            notes=result.notes,
            loss_start=truth.loss_start,
            loss_end=truth.loss_end,
            distance_sq=truth.distance_sq,
            ntk_top_eigenvalues=result.spectrum["w0"][:5].tolist(),
            sui_pipeline="the loo stage's forms (projected Jacobians, jacobian section) for the same samples",
        )
    write_json(METRICS_FILE, {"enabled": True, **metrics})
    run.log_artifacts(paths.VALIDATE / "plots", "plots")
    run.log_artifact(paths.VALIDATE / "table.md")
    if result.datamodels is not None:
        run.log_artifact(paths.VALIDATE / "lds.md")
        print(
            f"validate: LDS over {metrics['lds_subsets']} subsets, {metrics['lds_targets']} targets: exact group "
            f"removal {metrics['lds_group']:.3f}, sum of leave-one-out effects {metrics['lds_additive']:.3f}"
        )
    for row in rows:
        print(
            f"validate: {row['method']:>15}: weights Pearson {row['pearson_weights']:.3f} Spearman "
            f"{row['spearman_weights']:.3f}; predictions Pearson {row['pearson_predictions']:.3f} Spearman "
            f"{row['spearman_predictions']:.3f}; {row['seconds']:.1f} s"
        )
    return metrics


app = stage_app("validate", __doc__, body, sections=["validate", "training"])

if __name__ == "__main__":
    app()
