"""DVC stage `evaluate`: how well F-SI (and each SI) finds the training samples whose labels were flipped, and F-SI per data source."""

import numpy as np

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core import plots
from sui_core.evaluation import detection_metrics
from sui_core.io import atomic_dir, read_parquet, write_json
from sui_core.scores import SCORES

METRICS_FILE = paths.METRICS / "evaluate.json"


def body(cfg: Configs, run: StageRun) -> dict:
    table = read_parquet(paths.SCORES_FILE)
    noisy = table.column("noisy").to_numpy(zero_copy_only=False)
    metrics: dict = {"n_train": len(noisy), "n_noisy": int(noisy.sum())}
    for name in SCORES:
        found = detection_metrics(table.column(name).to_numpy(), noisy, cfg.evaluate.top_fractions)
        metrics.update({f"{name}_{key}": value for key, value in found.items()})
    if not 0 < noisy.sum() < len(noisy):
        print("evaluate: no flipped labels (data.label_noise = 0): detection metrics are not defined")
    fsi = table.column("fsi").to_numpy()
    source = np.asarray(table.column("source").to_pylist(), dtype=object)
    by_source = {name: source == name for name in sorted(set(source))}
    if len(by_source) > 1:  # which data source is more informative (paper Fig. 2a)
        metrics.update({f"fsi_mean_source_{name}": float(fsi[mask].mean()) for name, mask in by_source.items()})
    with atomic_dir(paths.EVALUATE) as out:
        plots.histogram(fsi, out / "plots" / "fsi_clean_vs_noisy.png", "F-SI (nats)",
                        groups={"clean label": ~noisy, "flipped label": noisy},
                        title="F-SI of samples with clean and flipped labels")
        if len(by_source) > 1:
            plots.histogram(fsi, out / "plots" / "fsi_by_source.png", "F-SI (nats)", groups=by_source,
                            title="F-SI by data source")
    write_json(METRICS_FILE, metrics)
    run.log_artifacts(paths.EVALUATE / "plots", "plots")
    run.log_artifact(METRICS_FILE)
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float)) and np.isfinite(value)}


app = stage_app("evaluate", __doc__, body, sections=["evaluate"])

if __name__ == "__main__":
    app()
