"""DVC stage `evaluate`: what the scores let users do (sui_core.studies.evaluate): mislabel detection by
F-SI, SI, sui's best detector and real-network baselines on the same noisy data; F-SI per data source, per
subclass (the rare one), of adversarial examples, and of whole groups left out at once; summarization and
robustness when enabled."""

import numpy as np

from stages import paths
from stages.common import Configs, StageRun, finite_numbers, stage_app
from sui_core.data.splits import read_split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir, read_npz, read_parquet, write_json
from sui_core.linearized.ntk import Basis
from sui_core.studies.evaluate import evaluate

METRICS_FILE = paths.METRICS / "evaluate.json"


class Inputs:
    """sui_core.studies.evaluate.Inputs from the upstream outputs, each checked when first opened."""

    def __init__(self, cfg: Configs):
        self.cfg = cfg

    def splits(self):
        prepared = self.cfg.input(paths.PREPARED)
        return tuple(read_split(prepared.file(f"{name}.parquet")) for name in ("train", "val", "test"))

    def model(self):
        from sui_core.network.models import load_model  # torch: only the studies that train a real network

        return load_model(self.cfg.input(paths.MODEL).path)

    def linearized(self, sample_id: np.ndarray):
        ntk = self.cfg.input(paths.NTK)
        residual = read_npz(ntk.file(paths.RESIDUAL_FILE.name), ["sample_id", "residual"])
        if not np.array_equal(residual["sample_id"], sample_id):
            raise ArtifactError(f"{paths.RESIDUAL_FILE}: samples do not match {paths.SCORES_FILE}")
        return Basis.load(ntk.file(paths.BASIS_FILE.name)), residual["residual"]


def body(cfg: Configs, run: StageRun) -> dict:
    scores = cfg.input(paths.SCORES)
    table = read_parquet(scores.file(paths.SCORES_FILE.name))
    groups = read_parquet(scores.file(paths.GROUP_SCORES_FILE.name)).to_pylist()
    with atomic_dir(paths.EVALUATE) as out:
        metrics = evaluate(cfg, Inputs(cfg), table, groups, out)
        cfg.publish(out, selected_detector={half: metrics.get(f"sui_best_{half}") for half in ("a", "b")})
    write_json(METRICS_FILE, metrics)
    if "sui_best_a" in metrics:
        run.set_tags({f"sui_best_detector_{half}": metrics[f"sui_best_{half}"] for half in ("a", "b")})
    run.log_artifact(METRICS_FILE)
    for name in ("plots", "detection.md", "detection.csv", "summarization", "robustness"):
        if (path := paths.EVALUATE / name).is_dir():
            run.log_artifacts(path, name)
        elif path.exists():
            run.log_artifact(path)
    return finite_numbers(metrics)


app = stage_app(
    "evaluate", __doc__, body, sections=["evaluate", "detection", "training", "jacobian", "summarization", "robustness"]
)

if __name__ == "__main__":
    app()
