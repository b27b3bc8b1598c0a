"""DVC stage `model`: the network at w0 (seeded init, weights from a state_dict file, or with model.pretrain
the pretrain stage's body and a fresh seeded head)."""

import dataclasses

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core.data.splits import read_split
from sui_core.errors import ArtifactError, ParamError
from sui_core.io import atomic_dir
from sui_core.network.models import build_model, save_model
from sui_core.network.outputs import num_outputs


def body(cfg: Configs, run: StageRun) -> dict:
    train = read_split(cfg.input(paths.PREPARED).file("train.parquet"))
    model_cfg = cfg.model
    if model_cfg.pretrain:
        pretrained = cfg.input(paths.PRETRAIN)
        if not pretrained.meta.get("enabled"):
            raise ArtifactError(
                f"{paths.PRETRAIN}: holds no pretrained body (model.pretrain needs the pretrain "
                f"stage's output: dvc repro)"
            )
        body_file = pretrained.file("body.pt")
        model_cfg = dataclasses.replace(model_cfg, init_path=str(body_file), pretrained_body=True)
    try:
        model = build_model(model_cfg, train.input_shape, num_outputs(train.num_classes))
    except ParamError as exc:
        if not model_cfg.pretrain:
            raise
        raise ParamError("pretrain.source", f"the pretrained body does not fit this network and data ({exc})") from None
    with atomic_dir(paths.MODEL) as out:
        info = save_model(out, model, {"num_classes": train.num_classes})
        cfg.publish(out)
    run.log_artifact(paths.MODEL / "model.json")
    return {"param_count": info["param_count"], "num_outputs": info["num_outputs"]}


app = stage_app("model", __doc__, body, sections=["model"])

if __name__ == "__main__":
    app()
