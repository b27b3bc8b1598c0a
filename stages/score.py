"""DVC stage `score`: per-sample F-SI and SI (isotropic, hessian, sgd smoothings) in nats, ranks, histogram and gallery;
the table also carries the loo stage's fit of each sample (leave-one-out loss, training loss, leverage)."""

from pathlib import Path

import numpy as np
import pyarrow as pa

from stages import paths
from stages.common import Configs, StageRun, stage_app
from sui_core import plots
from sui_core.data import read_split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir, read_parquet, write_parquet
from sui_core.scores import FIT, FORMS, SCORES, scores_from_forms


def body(cfg: Configs, run: StageRun) -> dict:
    loo = cfg.input(paths.LOO)
    forms_table = read_parquet(loo.file(paths.FORMS_FILE.name), ["sample_id", *FORMS, *FIT])
    loo_meta = loo.meta
    train = read_split(cfg.input(paths.PREPARED).file("train.parquet"))
    sample_id = forms_table.column("sample_id").to_numpy()
    if not np.array_equal(sample_id, train.sample_id):
        raise ArtifactError(f"{paths.FORMS_FILE}: samples do not match {paths.PREPARED / 'train.parquet'}")
    n = len(sample_id)
    batch_size = cfg.training.batch_size or n
    forms = {name: forms_table.column(name).to_numpy() for name in FORMS}
    scores = scores_from_forms(forms, loo_meta["n_val"], cfg.score.sigma, cfg.training.lr, batch_size)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-scores["fsi"], kind="stable")] = np.arange(1, n + 1)
    table = pa.table({"sample_id": sample_id, "label": train.label, "clean_label": train.clean_label,
                      "noisy": train.noisy, "source": train.source,
                      "group": pa.array(train.group.tolist(), pa.string()), **scores, "rank_fsi": rank,
                      **{name: forms_table.column(name) for name in FIT}})
    if train.adversarial is not None:  # data.adversarial: which images are FGSM examples
        table = table.append_column("adversarial", pa.array(train.adversarial, pa.bool_()))
    if train.text is not None:  # a text source (data.text_column): the raw texts, last column
        table = table.append_column("text", pa.array(train.text.tolist(), pa.string()))
    with atomic_dir(paths.SCORES) as out:
        write_parquet(out / paths.SCORES_FILE.name, table)
        plots.histogram(scores["fsi"], out / "plots" / "fsi_histogram.png", "F-SI (nats)",
                        title=f"F-SI of {n} training samples")
        if plots.is_image(list(train.input_shape)):
            plots.gallery(train.x, scores["fsi"], np.asarray(train.class_names)[train.label], out / "plots" / "fsi_gallery.png",
                          min(cfg.score.gallery_size, n // 2 or 1))
        write_parquet(out / paths.GROUP_SCORES_FILE.name,
                      group_scores(loo.file(paths.GROUPS_FILE.name), loo_meta["n_val"], cfg.score.sigma))
        cfg.publish(out, units="nats", sigma=cfg.score.sigma, batch_size=batch_size, scores=list(SCORES))
    run.log_artifacts(paths.SCORES / "plots", "plots")
    return {f"{name}_{stat}": float(fn(values)) for name, values in scores.items()
            for stat, fn in (("mean", np.mean), ("median", np.median), ("max", np.max))}


def group_scores(groups_file: Path, n_val: int, sigma: float) -> pa.Table:
    """F-SI of leaving each group out at once, beside the sum of its members' F-SI (nats)."""
    groups = read_parquet(groups_file).to_pydict()
    scale = 1 / (2 * sigma**2 * n_val)
    table = pa.table({"column": groups["column"], "group": groups["group"], "size": groups["size"],
                      "fsi_group": [v * scale for v in groups["fsi_sum"]],
                      "fsi_members_sum": [v * scale for v in groups["members_fsi_sum"]]})
    for row in table.to_pylist():
        print(f"score: group {row['column']}={row['group']} ({row['size']} samples): F-SI {row['fsi_group']:.4g} nats "
              f"left out together, {row['fsi_members_sum']:.4g} summed over its members")
    return table


app = stage_app("score", __doc__, body, sections=["score", "training"])

if __name__ == "__main__":
    app()
