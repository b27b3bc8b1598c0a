"""DVC stage `prepare`: load the data source, split it with a seed, flip training labels → Parquet splits."""

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.data.splits import prepare
from sui_core.io import atomic_dir


def body(cfg: Configs, run: StageRun) -> dict:
    with atomic_dir(paths.PREPARED) as out:
        summary = prepare(cfg.data, out)
        cfg.publish(out, summary=summary)
    run.log_artifact(paths.PREPARED / "meta.json")
    return {key: summary[key] for key in ("n_train", "n_val", "n_test", "noisy", "num_classes")}


app = stage_app("prepare", __doc__, body, sections=["data"])

if __name__ == "__main__":
    app()
