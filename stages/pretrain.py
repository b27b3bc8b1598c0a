"""DVC stage `pretrain`: with model.pretrain, the network trained first on a disjoint task; the model stage
starts from its body (the paper's pretrained setting). Off: a constant record, so nothing downstream reruns.

torch and the pretraining code are imported only when it is on: off (the default) the stage costs no
more than starting Python."""

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core import artifacts
from sui_core.io import atomic_dir

BODY_FILE = paths.PRETRAIN / "body.pt"


def body(cfg: Configs, run: StageRun) -> dict:
    with atomic_dir(paths.PRETRAIN) as out:
        if not cfg.model.pretrain:
            artifacts.publish(out, "pretrain", {}, enabled=False)  # constant: turning it off reruns nothing
            return {}
        import torch

        from sui_core.network.pretrain import pretrain

        model, info = pretrain(cfg.model, cfg.pretrain, cfg.data, progress=True)
        torch.save(model.state_dict(), out / BODY_FILE.name)
        cfg.publish(out, enabled=True, **info)
    return info


app = stage_app("pretrain", __doc__, body, sections=["model", "pretrain", "data"])

if __name__ == "__main__":
    app()
