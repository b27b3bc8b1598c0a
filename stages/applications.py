"""Parts of the `evaluate` stage that retrain or re-score networks: data summarization and robustness
of the scores (sui_core.summarization, sui_core.robustness). Each is off unless its params section
says `enabled: true`; each writes under the evaluate output folder and returns its metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from stages import paths
from stages.common import Configs
from sui_core import plots, robustness, summarization
from sui_core.baselines import seeded_builder
from sui_core.config import ModelConfig
from sui_core.data import Split, read_split
from sui_core.errors import ParamError
from sui_core.io import atomic_path, read_json
from sui_core.models import targets
from sui_core.solver import Recipe


def _splits(cfg: Configs) -> tuple[Split, Split, Split]:
    prepared = cfg.input(paths.PREPARED)
    return tuple(read_split(prepared.file(f"{name}.parquet")) for name in ("train", "val", "test"))


def _network(cfg: Configs) -> tuple[ModelConfig, dict]:
    """The architecture of data/model (arch, hidden, freeze) as a config whose init seed can be changed."""
    info = read_json(cfg.input(paths.MODEL).file("model.json"))
    return ModelConfig(arch=info["arch"], hidden=info["hidden"] or [], freeze=info.get("freeze") or []), info


def summarize_data(cfg: Configs, out: Path) -> dict:
    """Test accuracy vs fraction removed per strategy: plot, tables, and accuracy drops as metrics."""
    settings = cfg.summarization
    if not settings.enabled:
        return {}
    if cfg.training.dynamics != "discrete" or not math.isfinite(cfg.training.t):
        raise ParamError("training.dynamics", "summarization retrains the network for t gradient steps: it needs "
                         "discrete dynamics and a finite training.t")
    train, val, test = _splits(cfg)
    arch, info = _network(cfg)
    build = seeded_builder(arch, info["input_shape"], info["num_outputs"])
    rows = summarization.summarize(build, torch.as_tensor(train.x), targets(train.label, train.num_classes),
                                   torch.as_tensor(val.x), torch.as_tensor(test.x), test.clean_label,
                                   Recipe.from_config(cfg.training), cfg.jacobian, settings)
    table = summarization.curves(rows)
    folder = out / "summarization"
    summarization.write_tables(rows, table, folder / "runs.csv", folder / "curves.csv", folder / "curves.md")
    fractions = np.array(sorted(settings.fractions))
    by = {(r["strategy"], r["fraction"]): r for r in table}
    plots.curves_with_bands(
        fractions, {name: (np.array([by[name, f]["mean"] for f in fractions]),
                           np.array([by[name, f]["std"] for f in fractions])) for name in settings.strategies},
        out / "plots" / "summarization.png", "fraction of the training set removed", "test accuracy",
        title=f"Summarization: n = {len(train)}, {len(test)} test samples, mean ± std over {len(settings.seeds)} seeds")
    metrics = {f"summarization_{key}": value for key, value in summarization.accuracy_drops(table).items()}
    metrics["summarization_accuracy_unpruned"] = next(r["mean"] for r in table if r["fraction"] == 0)
    return metrics


def score_robustness(cfg: Configs, out: Path) -> dict:
    """Spearman correlations of F-SI across architectures, init seeds and training lengths."""
    settings = cfg.robustness
    if not settings.enabled:
        return {}
    train, val, _ = _splits(cfg)
    arch, info = _network(cfg)
    var = robustness.variants(tuple(settings.archs), tuple(settings.init_seeds), tuple(settings.steps))
    scores = robustness.fsi_variants(arch, torch.as_tensor(train.x), targets(train.label, train.num_classes),
                                     torch.as_tensor(val.x), Recipe.from_config(cfg.training), cfg.jacobian, var,
                                     info["num_outputs"])
    matrix = robustness.spearman_matrix(scores)
    names = [v.name for v in var]
    plots.matrix(matrix, names, out / "plots" / "robustness_spearman.png",
                 title=f"Spearman correlation of F-SI (n = {len(train)})")
    with atomic_path(out / "robustness" / "spearman.csv") as tmp:
        tmp.write_text("\n".join([",".join(["variant", *names])] +
                                 [",".join([name, *map(repr, row.tolist())]) for name, row in zip(names, matrix)]) + "\n")
    return {f"robustness_{key}": value for key, value in robustness.headline(matrix).items()}
