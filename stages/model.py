"""DVC stage `model`: the network at w0 (seeded init, or weights from a state_dict file)."""

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.data import read_split
from sui_core.io import atomic_dir, code_version
from sui_core.models import build_model, num_outputs, save_model


def body(cfg: Configs, run: StageRun) -> dict:
    train = read_split(paths.PREPARED / "train.parquet")
    model = build_model(cfg.model, train.input_shape, num_outputs(train.num_classes))
    with atomic_dir(paths.MODEL) as out:
        info = save_model(out, model, {"params": cfg.record(), "code": code_version(),
                                       "num_classes": train.num_classes})
    run.log_artifact(paths.MODEL / "model.json")
    return {"param_count": info["param_count"], "num_outputs": info["num_outputs"]}


app = stage_app("model", __doc__, body, sections=["model"])

if __name__ == "__main__":
    app()
