"""DVC stage `score`: per-sample F-SI and SI (isotropic, hessian, sgd smoothings) in nats, ranks, histogram and gallery;
the table also carries the loo stage's fit of each sample (leave-one-out loss, training loss, leverage)."""

import numpy as np

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core import plots
from sui_core.data.splits import read_split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir, read_parquet, write_parquet
from sui_core.linearized.scores import FIT, FORMS, SCORES, group_scores, score_table


def body(cfg: Configs, run: StageRun) -> dict:
    loo = cfg.input(paths.LOO)
    forms = read_parquet(loo.file(paths.FORMS_FILE.name), ["sample_id", *FORMS, *FIT])
    train = read_split(cfg.input(paths.PREPARED).file("train.parquet"))
    if not np.array_equal(forms.column("sample_id").to_numpy(), train.sample_id):
        raise ArtifactError(f"{paths.FORMS_FILE}: samples do not match {paths.PREPARED / 'train.parquet'}")
    batch_size = cfg.training.batch_size or len(train)
    table, scores = score_table(forms, train, loo.meta["n_val"], cfg.score.sigma, cfg.training.lr, batch_size)
    groups = group_scores(read_parquet(loo.file(paths.GROUPS_FILE.name)), loo.meta["n_val"], cfg.score.sigma)
    for row in groups.to_pylist():
        print(
            f"score: group {row['column']}={row['group']} ({row['size']} samples): F-SI {row['fsi_group']:.4g} nats "
            f"left out together, {row['fsi_members_sum']:.4g} summed over its members"
        )
    with atomic_dir(paths.SCORES) as out:
        write_parquet(out / paths.SCORES_FILE.name, table)
        plots.histogram(
            scores["fsi"],
            out / "plots" / "fsi_histogram.png",
            "F-SI (nats)",
            title=f"F-SI of {len(train)} training samples",
        )
        if plots.is_image(list(train.input_shape)):
            plots.gallery(
                train.x,
                scores["fsi"],
                np.asarray(train.class_names)[train.label],
                out / "plots" / "fsi_gallery.png",
                min(cfg.score.gallery_size, len(train) // 2 or 1),
            )
        write_parquet(out / paths.GROUP_SCORES_FILE.name, groups)
        cfg.publish(out, units="nats", sigma=cfg.score.sigma, batch_size=batch_size, scores=list(SCORES))
    run.log_artifacts(paths.SCORES / "plots", "plots")
    return {
        f"{name}_{stat}": float(fn(values))
        for name, values in scores.items()
        for stat, fn in (("mean", np.mean), ("median", np.median), ("max", np.max))
    }


app = stage_app("score", __doc__, body, sections=["score", "training"])

if __name__ == "__main__":
    app()
