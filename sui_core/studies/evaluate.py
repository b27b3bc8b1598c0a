"""What the scores let users do (the evaluate stage's work, without any file layout): mislabel detection
by F-SI, SI, sui's best detector and real-network baselines on the same noisy data; F-SI per data source,
per subclass (the rare one), of adversarial examples, and of whole groups left out at once; and, each
off unless enabled, data summarization and the robustness of the scores (they retrain networks).

`evaluate(settings, inputs, table, groups, out)` writes tables and plots under `out` and returns the
metrics. `settings` holds the config sections (evaluate, detection, training, jacobian, summarization,
robustness); `inputs` loads what a part needs only when it runs (`Inputs`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
from scipy.stats import spearmanr

from sui_core import plots
from sui_core.config import (
    DetectionConfig,
    EvaluateConfig,
    JacobianConfig,
    ModelConfig,
    RobustnessConfig,
    SummarizationConfig,
    TrainingConfig,
)
from sui_core.data.splits import Split
from sui_core.errors import ArtifactError
from sui_core.io import atomic_path, write_parquet
from sui_core.linearized.ntk import Basis
from sui_core.linearized.scores import FIT, SCORES
from sui_core.linearized.solver import Recipe
from sui_core.network.outputs import targets
from sui_core.studies import detection
from sui_core.studies.evaluation import detection_metrics, rare_subgroup_report, write_table

if TYPE_CHECKING:
    from torch import nn

# torch and the modules that train real networks (baselines, summarization, robustness, network.models) are
# imported inside the functions that use them: the default evaluate trains no network and does not need them


class Settings(Protocol):
    evaluate: EvaluateConfig
    detection: DetectionConfig
    training: TrainingConfig
    jacobian: JacobianConfig
    summarization: SummarizationConfig
    robustness: RobustnessConfig


class Inputs(Protocol):
    """The upstream results, loaded on demand (the pipeline checks and records each one it opens)."""

    def splits(self) -> tuple[Split, Split, Split]:
        """The prepared train, validation and test splits."""

    def model(self) -> tuple[nn.Module, dict]:
        """The network at w0 and its description (model.json)."""

    def linearized(self, sample_id: np.ndarray) -> tuple[Basis, np.ndarray]:
        """The kernel basis and the residual Y − f0 (n, k), checked to hold `sample_id` in order."""


def evaluate(settings: Settings, inputs: Inputs, table: pa.Table, groups: list[dict], out: Path) -> dict:
    """Every evaluation of the scores `table` (the score stage's table) and `groups` (its group rows)."""
    fsi = table.column("fsi").to_numpy()
    metrics = mislabel_detection(settings, inputs, table, out)
    metrics |= by_column("source", fsi, _strings(table, "source"), out)
    metrics |= subclasses(fsi, table, out)
    metrics |= adversarial(fsi, table, out)
    metrics |= group_information(groups, out)
    return metrics | summarize_data(settings, inputs, out) | score_robustness(settings, inputs, out)


def network(inputs: Inputs) -> tuple[ModelConfig, dict]:
    """The architecture of the network at w0 (arch, hidden, freeze) as a config whose init seed can change."""
    from sui_core.network.models import architecture

    _, info = inputs.model()
    return architecture(info), info


def mislabel_detection(settings: Settings, inputs: Inputs, table: pa.Table, out: Path) -> dict:
    """F-SI and SI on all samples; then every method (sui's candidates, sui's best, the baselines) in two
    folds, sui's best chosen on one half and reported on the other (sui_core.studies.detection.cross_selected)."""
    noisy = table.column("noisy").to_numpy(zero_copy_only=False)
    n = len(noisy)
    metrics: dict = {"n_train": n, "n_noisy": int(noisy.sum())}
    for name in SCORES:
        found = detection_metrics(table.column(name).to_numpy(), noisy, settings.evaluate.top_fractions)
        metrics.update({f"{name}_{key}": value for key, value in found.items()})
    plots.histogram(
        table.column("fsi").to_numpy(),
        out / "plots" / "fsi_clean_vs_noisy.png",
        "F-SI (nats)",
        groups={"clean label": ~noisy, "flipped label": noisy},
        title="F-SI of samples with clean and flipped labels",
    )
    half_a = detection.selection_split(n, settings.detection.selection_fraction, settings.detection.selection_seed)
    if not all(0 < noisy[half].sum() < half.sum() for half in (half_a, ~half_a)):
        print(
            "evaluate: both halves need flipped and clean labels (data.label_noise > 0): mislabel detection "
            "against baselines is not evaluated"
        )
        return metrics
    sample_id = table.column("sample_id").to_numpy()
    fit = {name: table.column(name).to_numpy() for name in FIT}
    others = []
    recipe = Recipe.from_config(settings.training)
    if lengths := detection.other_lengths(recipe, settings.detection.t_factors):
        basis, residual = inputs.linearized(sample_id)
        others = [detection.linearized_fit(basis, residual, other) for other in lengths]
    real, issues = real_network_baselines(settings, inputs, sample_id) if settings.detection.baselines else ({}, None)
    scores = {name: table.column(name).to_numpy() for name in SCORES}
    candidates = detection.sui_detectors(scores["fsi"], fit, others, real.get("loss"))
    rows, folds, chosen = detection.cross_selected(
        candidates, scores | real, noisy, half_a, settings.evaluate.top_fractions
    )
    print(f"evaluate: sui's best detector, chosen by AP on half a: {chosen['a']}; on half b: {chosen['b']}")
    rows = {name: rows[name] for name in [*SCORES, *(c for c in candidates if c != "fsi"), "sui_best", *real]}
    metrics |= {f"report_{name}_{key}": value for name, row in rows.items() for key, value in row.items()}
    metrics |= {
        f"fold_{fold}_{name}_{key}": row[key]
        for fold, fold_rows in folds.items()
        for name, row in fold_rows.items()
        for key in ("auroc", "ap")
    }
    metrics |= {
        "sui_best_a": chosen["a"],
        "sui_best_b": chosen["b"],
        "n_half_a": int(half_a.sum()),
        "n_half_a_noisy": int(noisy[half_a].sum()),
        "n_half_b": int((~half_a).sum()),
        "n_half_b_noisy": int(noisy[~half_a].sum()),
    }
    if issues is not None:  # cleanlab's own yes/no set, on all samples (it involves no choice)
        hit = issues & noisy
        metrics |= {
            "cleanlab_issues": int(issues.sum()),
            "cleanlab_issues_precision": float(hit.sum() / max(issues.sum(), 1)),
            "cleanlab_issues_recall": float(hit.sum() / noisy.sum()),
        }
    metrics |= why_fsi_is_less_precise(scores["fsi"], fit, noisy)
    columns = ["auroc", "ap", *[k for k in rows["fsi"] if k.startswith("found_at")]]
    write_table(rows, columns, out / "detection.csv", out / "detection.md")
    plots.bars(
        {name: {"AUROC": row["auroc"], "AP": row["ap"]} for name, row in rows.items()},
        out / "plots" / "detection.png",
        "mean of the two folds",
        title=f"Flipped-label detection ({n} samples, each half reported with sui_best chosen on the other: "
        f"{chosen['a']} / {chosen['b']})",
    )
    plots.histogram(
        candidates[chosen["a"]],
        out / "plots" / "sui_best_clean_vs_noisy.png",
        chosen["a"],
        groups={"clean label": ~noisy, "flipped label": noisy},
        title="sui's best detector (chosen on half a) for clean and flipped labels",
    )
    write_parquet(
        out / "detection_scores.parquet",
        pa.table(
            {
                "sample_id": sample_id,
                "noisy": noisy,
                "half_a": half_a,
                **scores,
                **candidates,
                **real,
                "leverage": fit["leverage"],
                "train_loss_linearized": fit["train_loss"],
            }
        ),
    )
    return metrics


def real_network_baselines(
    settings: Settings, inputs: Inputs, sample_id: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """`baselines.real_network_scores` of `detection.baselines` on the noisy training labels."""
    from sui_core.studies import baselines

    train, _, _ = inputs.splits()
    if not np.array_equal(train.sample_id, sample_id):
        raise ArtifactError("the prepared training split's samples do not match the scores' (rerun the pipeline)")
    model, info = inputs.model()
    return baselines.real_network_scores(
        model,
        info,
        train.x,
        train.label,
        train.num_classes,
        settings.detection.baselines,
        settings.training,
        settings.detection,
        "detection.baselines",
    )


def why_fsi_is_less_precise(fsi: np.ndarray, fit: dict[str, np.ndarray], noisy: np.ndarray) -> dict:
    """Measured on all samples: F-SI ≈ leave-one-out loss × G (F-SI per unit of it). Which clean
    samples reach the top |flipped| of F-SI, and does G carry any label information?"""
    influence = fsi / np.maximum(fit["loo_loss"], 1e-300)
    top = np.zeros(len(fsi), bool)
    top[np.argsort(-fsi, kind="stable")[: noisy.sum()]] = True
    clean_top, clean = top & ~noisy, ~noisy
    return {
        "why_clean_in_top_fsi": int(clean_top.sum()),
        "why_spearman_fsi_loo_loss": float(spearmanr(fsi, fit["loo_loss"])[0]),
        "why_influence_auroc": detection_metrics(influence, noisy, [])["auroc"],
        **{
            f"why_median_{name}_{part}": float(np.median(values[mask]))
            for name, values in (("loo_loss", fit["loo_loss"]), ("influence", influence), ("leverage", fit["leverage"]))
            for part, mask in (("clean_in_top_fsi", clean_top), ("clean", clean), ("flipped", noisy))
            if mask.any()
        },
    }


def by_column(column: str, fsi: np.ndarray, values: np.ndarray, out) -> dict:
    """Mean F-SI per value of a column with several values (e.g. data sources, paper Fig. 2a) and a histogram."""
    masks = {name: values == name for name in sorted({v for v in values if v is not None})}
    if len(masks) < 2:
        return {}
    plots.histogram(fsi, out / "plots" / f"fsi_by_{column}.png", "F-SI (nats)", groups=masks, title=f"F-SI by {column}")
    return {f"fsi_mean_{column}_{_key(name)}": float(fsi[mask].mean()) for name, mask in masks.items()}


def subclasses(fsi: np.ndarray, table: pa.Table, out) -> dict:
    """Classes made of several groups (data.subclass: the original classes): F-SI per group, and the
    AUROC of F-SI for picking out the rare one within its class (paper A.6)."""
    group = _strings(table, "group")
    if not any(g is not None for g in group):
        return {}
    by_column("group", fsi, group, out)
    report = rare_subgroup_report(fsi, table.column("clean_label").to_numpy(), group)  # classes before label noise
    return {f"fsi_{_key(key)}": value for key, value in report.items()}


def adversarial(fsi: np.ndarray, table: pa.Table, out) -> dict:
    """Training images replaced by FGSM examples (data.adversarial): F-SI histogram and detection."""
    if "adversarial" not in table.column_names:
        return {}
    flag = table.column("adversarial").to_numpy(zero_copy_only=False).astype(bool)
    if not flag.any():
        return {}
    plots.histogram(
        fsi,
        out / "plots" / "fsi_adversarial.png",
        "F-SI (nats)",
        groups={"original image": ~flag, "FGSM image": flag},
        title="F-SI of adversarial examples",
    )
    found = detection_metrics(fsi, flag, [])
    return {
        "n_adversarial": int(flag.sum()),
        "adversarial_fsi_auroc": found.get("auroc", float("nan")),
        "adversarial_fsi_ap": found.get("ap", float("nan")),
        "fsi_mean_adversarial": float(fsi[flag].mean()),
        "fsi_mean_not_adversarial": float(fsi[~flag].mean()),
    }


def group_information(rows: list[dict], out: Path) -> dict:
    """Each group left out at once (loo.groups) beside the sum of its members' F-SI, and a bar plot."""
    if not rows:
        return {}
    plots.bars(
        {
            f"{r['column']}={r['group']}": {
                "left out together": r["fsi_group"],
                "sum of members' F-SI": r["fsi_members_sum"],
            }
            for r in rows
        },
        out / "plots" / "group_fsi.png",
        "F-SI (nats)",
        title="Group unique information",
        log=True,
    )
    metrics = {}
    for r in rows:
        key = f"{r['column']}_{_key(r['group'])}"
        metrics |= {f"group_fsi_{key}": r["fsi_group"], f"group_members_fsi_sum_{key}": r["fsi_members_sum"]}
    return metrics


def _strings(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, None, dtype=object)
    return np.asarray(table.column(column).to_pylist(), dtype=object)


def _key(name) -> str:
    """A metric-name-safe form of a group or source name."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name))


def summarize_data(settings: Settings, inputs: Inputs, out: Path) -> dict:
    """Test accuracy vs fraction removed per strategy: plot, tables, and accuracy drops as metrics."""
    summary = settings.summarization
    if not summary.enabled:
        return {}
    import torch

    from sui_core.studies import summarization
    from sui_core.studies.baselines import seeded_builder

    settings.training.whole_steps("summarization")
    train, val, test = inputs.splits()
    arch, info = network(inputs)
    build = seeded_builder(arch, info["input_shape"], info["num_outputs"])
    rows = summarization.summarize(
        build,
        torch.as_tensor(train.x),
        targets(train.label, train.num_classes),
        torch.as_tensor(val.x),
        torch.as_tensor(test.x),
        test.clean_label,
        Recipe.from_config(settings.training),
        settings.jacobian,
        summary,
    )
    table = summarization.curves(rows)
    folder = out / "summarization"
    summarization.write_tables(rows, table, folder / "runs.csv", folder / "curves.csv", folder / "curves.md")
    fractions = np.array(sorted(summary.fractions))
    by = {(r["strategy"], r["fraction"]): r for r in table}
    plots.curves_with_bands(
        fractions,
        {
            name: (
                np.array([by[name, f]["mean"] for f in fractions]),
                np.array([by[name, f]["std"] for f in fractions]),
            )
            for name in summary.strategies
        },
        out / "plots" / "summarization.png",
        "fraction of the training set removed",
        "test accuracy",
        title=f"Summarization: n = {len(train)}, {len(test)} test samples, mean ± std over {len(summary.seeds)} seeds",
    )
    metrics = {f"summarization_{key}": value for key, value in summarization.accuracy_drops(table).items()}
    metrics["summarization_accuracy_unpruned"] = next(r["mean"] for r in table if r["fraction"] == 0)
    return metrics


def score_robustness(settings: Settings, inputs: Inputs, out: Path) -> dict:
    """Spearman correlations of F-SI across architectures, init seeds and training lengths."""
    robust = settings.robustness
    if not robust.enabled:
        return {}
    import torch

    from sui_core.studies import robustness

    train, val, _ = inputs.splits()
    arch, info = network(inputs)
    var = robustness.variants(tuple(robust.archs), tuple(robust.init_seeds), tuple(robust.steps))
    scores = robustness.fsi_variants(
        arch,
        torch.as_tensor(train.x),
        targets(train.label, train.num_classes),
        torch.as_tensor(val.x),
        Recipe.from_config(settings.training),
        settings.jacobian,
        var,
        info["num_outputs"],
    )
    matrix = robustness.spearman_matrix(scores)
    names = [v.name for v in var]
    plots.matrix(
        matrix,
        names,
        out / "plots" / "robustness_spearman.png",
        title=f"Spearman correlation of F-SI (n = {len(train)})",
    )
    with atomic_path(out / "robustness" / "spearman.csv") as tmp:
        tmp.write_text(
            "\n".join(
                [",".join(["variant", *names])]
                + [",".join([name, *map(repr, row.tolist())]) for name, row in zip(names, matrix)]
            )
            + "\n"
        )
    return {f"robustness_{key}": value for key, value in robustness.headline(matrix).items()}
