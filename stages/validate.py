"""DVC stage `validate`: sui's estimates and influence functions against really retraining the network
without each of m sampled training samples (the paper's Table 1). Off by default (validate.enabled):
then it writes a small "disabled" record at once."""

import numpy as np
import pyarrow as pa
import torch

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core import plots
from sui_core.data import read_split
from sui_core.errors import ArtifactError, ParamError
from sui_core import artifacts
from sui_core.io import atomic_dir, read_parquet, write_json, write_parquet
from sui_core.models import load_model, targets
from sui_core.solver import Recipe
from sui_core.validation import Changes, agreement, validate

METRICS_FILE = paths.METRICS / "validate.json"
QUANTITIES = ("weights", "predictions")


def body(cfg: Configs, run: StageRun) -> dict:
    v = cfg.validate
    if not v.enabled:
        with atomic_dir(paths.VALIDATE) as out:
            artifacts.publish(out, "validate", {}, enabled=False)
        write_json(METRICS_FILE, {"enabled": False})
        return {}
    if cfg.training.dynamics != "discrete" or not np.isfinite(cfg.training.t):
        raise ParamError("training.t", "validate retrains the network for a whole number of steps: needs "
                         f"dynamics discrete and a finite t (got {cfg.training.dynamics}, t = {cfg.training.t})")
    prepared = cfg.input(paths.PREPARED)
    train = read_split(prepared.file("train.parquet"))
    val = read_split(prepared.file("val.parquet"))
    if v.samples > len(train):
        raise ParamError("validate.samples", f"must be at most the {len(train)} training samples, got {v.samples}")
    model, _ = load_model(cfg.input(paths.MODEL).path)
    dtype = getattr(torch, v.dtype)
    model = model.to(dtype)
    recipe = Recipe.from_config(cfg.training)
    result = validate(model, torch.as_tensor(train.x), targets(train.label, train.num_classes), torch.as_tensor(val.x),
                      recipe, v.samples, v.seed, tuple(v.influence), v.exact_max_params, v.lissa_depth, v.lissa_scale,
                      v.lissa_damping, v.lissa_batch_size, v.checkpoint_fraction, progress=True)
    estimates = dict(result.estimates)
    estimates["sui_pipeline"] = pipeline_changes(cfg.input(paths.LOO).file(paths.FORMS_FILE.name),
                                                 train.sample_id[result.left_out])
    truth = result.truth
    rows = [{"method": name, **agreement(truth.changes, est)} for name, est in estimates.items()]
    with atomic_dir(paths.VALIDATE) as out:
        columns = {"sample_id": train.sample_id[result.left_out], "noisy": train.noisy[result.left_out],
                   **{f"real_{q}": getattr(truth.changes, q) for q in QUANTITIES}}
        for name, est in estimates.items():
            columns.update({f"{name}_{q}": getattr(est, q) for q in QUANTITIES})
        write_parquet(out / "changes.parquet", pa.table(columns))
        write_parquet(out / "table.parquet", pa.Table.from_pylist(rows))
        (out / "table.md").write_text(markdown(rows))
        plots.scatter_grid({q: getattr(truth.changes, q) for q in QUANTITIES},
                           {name: {q: getattr(est, q) for q in QUANTITIES} for name, est in estimates.items()},
                           out / "plots" / "scatter.png", f"leave-one-out changes of {len(result.left_out)} samples")
        cfg.publish(out, enabled=True, n=len(train), n_val=len(val),
                   checkpoint_step=result.checkpoint_step, notes=result.notes, loss_start=truth.loss_start,
                   loss_end=truth.loss_end, distance_sq=truth.distance_sq,
                   ntk_top_eigenvalues=result.spectrum["w0"][:5].tolist(),
                   sui_pipeline="the loo stage's forms (projected Jacobians, jacobian section) for the same samples")
    metrics = {f"{row['method']}_{key}": value for row in rows for key, value in row.items()
               if key != "method" and np.isfinite(value)}
    metrics.update(retrain_seconds=truth.changes.seconds, loss_end=truth.loss_end, distance_sq=truth.distance_sq)
    write_json(METRICS_FILE, {"enabled": True, **metrics})
    run.log_artifacts(paths.VALIDATE / "plots", "plots")
    run.log_artifact(paths.VALIDATE / "table.md")
    for row in rows:
        print(f"validate: {row['method']:>15}: weights Pearson {row['pearson_weights']:.3f} Spearman "
              f"{row['spearman_weights']:.3f}; predictions Pearson {row['pearson_predictions']:.3f} Spearman "
              f"{row['spearman_predictions']:.3f}; {row['seconds']:.1f} s")
    return metrics


def pipeline_changes(forms_file, sample_id: np.ndarray) -> Changes:
    """The loo stage's σ-free forms of the sampled samples (its Jacobians are projected: dv_sq covers the
    projected coordinates only); no time of its own here (see the pipeline stages' times)."""
    forms = read_parquet(forms_file, ["sample_id", "fsi_sum", "dv_sq"]).to_pydict()
    row_of = {sid: i for i, sid in enumerate(forms["sample_id"])}
    missing = [int(s) for s in sample_id if s not in row_of]
    if missing:
        raise ArtifactError(f"{paths.FORMS_FILE}: no forms for samples {missing[:5]} (rerun the loo stage)")
    rows = [row_of[s] for s in sample_id]
    return Changes(np.asarray(forms["dv_sq"])[rows], np.asarray(forms["fsi_sum"])[rows], float("nan"))


def markdown(rows: list[dict]) -> str:
    lines = ["| method | weights Pearson | weights Spearman | predictions Pearson | predictions Spearman | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['pearson_weights']:.3f} | {r['spearman_weights']:.3f} | "
              f"{r['pearson_predictions']:.3f} | {r['spearman_predictions']:.3f} | "
              f"{'–' if np.isnan(r['seconds']) else round(r['seconds'], 1)} |" for r in rows]
    return "\n".join(lines) + "\n"


app = stage_app("validate", __doc__, body, sections=["validate", "training"])

if __name__ == "__main__":
    app()
