"""DVC stage `evaluate`: what the scores let users do. Mislabel detection by F-SI, SI, sui's best
detector and real-network baselines on the same noisy data; F-SI per data source, per subclass (the
rare one), of adversarial examples, and of whole groups left out at once."""

import re

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import spearmanr

from stages import applications, paths
from stages.common import Configs, StageRun, stage_app
from sui_core import baselines, detection, plots
from sui_core.config import ModelConfig
from sui_core.data import read_split
from sui_core.errors import ArtifactError, ParamError
from sui_core.evaluation import detection_metrics, rare_subgroup_report, write_table
from sui_core.io import atomic_dir, read_npz, read_parquet, write_json, write_parquet
from sui_core.models import load_model, targets
from sui_core.ntk import Basis
from sui_core.scores import FIT, SCORES
from sui_core.solver import Recipe

METRICS_FILE = paths.METRICS / "evaluate.json"


def body(cfg: Configs, run: StageRun) -> dict:
    scores = cfg.input(paths.SCORES)
    table = read_parquet(scores.file(paths.SCORES_FILE.name))
    fsi = table.column("fsi").to_numpy()
    metrics: dict = {}
    with atomic_dir(paths.EVALUATE) as out:
        metrics |= mislabel_detection(cfg, table, out, run)
        metrics |= by_column("source", fsi, _strings(table, "source"), out)
        metrics |= subclasses(fsi, table, out)
        metrics |= adversarial(fsi, table, out)
        metrics |= group_information(scores.file(paths.GROUP_SCORES_FILE.name), out)
        # retraining / re-scoring applications (stages/applications.py), each off unless enabled
        metrics |= applications.summarize_data(cfg, out) | applications.score_robustness(cfg, out)
        cfg.publish(out, selected_detector={half: metrics.get(f"sui_best_{half}") for half in ("a", "b")})
    write_json(METRICS_FILE, metrics)
    run.log_artifacts(paths.EVALUATE / "plots", "plots")
    run.log_artifact(METRICS_FILE)
    for name in ("detection.md", "detection.csv"):
        if (paths.EVALUATE / name).exists():
            run.log_artifact(paths.EVALUATE / name)
    for folder in ("summarization", "robustness"):
        if (paths.EVALUATE / folder).is_dir():
            run.log_artifacts(paths.EVALUATE / folder, folder)
    return {key: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)}


def mislabel_detection(cfg: Configs, table: pa.Table, out, run: StageRun) -> dict:
    """F-SI and SI on all samples; then every method (sui's candidates, sui's best, the baselines) in two
    folds, sui's best chosen on one half and reported on the other (sui_core.detection.cross_selected)."""
    noisy = table.column("noisy").to_numpy(zero_copy_only=False)
    n = len(noisy)
    metrics: dict = {"n_train": n, "n_noisy": int(noisy.sum())}
    for name in SCORES:
        found = detection_metrics(table.column(name).to_numpy(), noisy, cfg.evaluate.top_fractions)
        metrics.update({f"{name}_{key}": value for key, value in found.items()})
    plots.histogram(table.column("fsi").to_numpy(), out / "plots" / "fsi_clean_vs_noisy.png", "F-SI (nats)",
                    groups={"clean label": ~noisy, "flipped label": noisy},
                    title="F-SI of samples with clean and flipped labels")
    half_a = detection.selection_split(n, cfg.detection.selection_fraction, cfg.detection.selection_seed)
    if not all(0 < noisy[half].sum() < half.sum() for half in (half_a, ~half_a)):
        print("evaluate: both halves need flipped and clean labels (data.label_noise > 0): mislabel detection "
              "against baselines is not evaluated")
        return metrics
    sample_id = table.column("sample_id").to_numpy()
    fit = {name: table.column(name).to_numpy() for name in FIT}
    others = []
    recipe = Recipe.from_config(cfg.training)
    if lengths := detection.other_lengths(recipe, cfg.detection.t_factors):
        ntk = cfg.input(paths.NTK)
        residual = read_npz(ntk.file(paths.RESIDUAL_FILE.name), ["sample_id", "residual"])
        if not np.array_equal(residual["sample_id"], sample_id):
            raise ArtifactError(f"{paths.RESIDUAL_FILE}: samples do not match {paths.SCORES_FILE}")
        basis = Basis.load(ntk.file(paths.BASIS_FILE.name))
        others = [detection.linearized_fit(basis, residual["residual"], other) for other in lengths]
    real, issues = real_network_baselines(cfg, sample_id) if cfg.detection.baselines else ({}, None)
    scores = {name: table.column(name).to_numpy() for name in SCORES}
    candidates = detection.sui_detectors(scores["fsi"], fit, others, real.get("loss"))
    rows, folds, chosen = detection.cross_selected(candidates, scores | real, noisy, half_a, cfg.evaluate.top_fractions)
    print(f"evaluate: sui's best detector, chosen by AP on half a: {chosen['a']}; on half b: {chosen['b']}")
    run.set_tags({"sui_best_detector_a": chosen["a"], "sui_best_detector_b": chosen["b"]})
    rows = {name: rows[name] for name in [*SCORES, *(c for c in candidates if c != "fsi"), "sui_best", *real]}
    metrics |= {f"report_{name}_{key}": value for name, row in rows.items() for key, value in row.items()}
    metrics |= {f"fold_{fold}_{name}_{key}": row[key] for fold, fold_rows in folds.items()
                for name, row in fold_rows.items() for key in ("auroc", "ap")}
    metrics |= {"sui_best_a": chosen["a"], "sui_best_b": chosen["b"], "n_half_a": int(half_a.sum()),
                "n_half_a_noisy": int(noisy[half_a].sum()), "n_half_b": int((~half_a).sum()),
                "n_half_b_noisy": int(noisy[~half_a].sum())}
    if issues is not None:  # cleanlab's own yes/no set, on all samples (it involves no choice)
        hit = issues & noisy
        metrics |= {"cleanlab_issues": int(issues.sum()),
                    "cleanlab_issues_precision": float(hit.sum() / max(issues.sum(), 1)),
                    "cleanlab_issues_recall": float(hit.sum() / noisy.sum())}
    metrics |= why_fsi_is_less_precise(scores["fsi"], fit, noisy)
    columns = ["auroc", "ap", *[k for k in rows["fsi"] if k.startswith("found_at")]]
    write_table(rows, columns, out / "detection.csv", out / "detection.md")
    plots.bars({name: {"AUROC": row["auroc"], "AP": row["ap"]} for name, row in rows.items()},
               out / "plots" / "detection.png", "mean of the two folds",
               title=f"Flipped-label detection ({n} samples, each half reported with sui_best chosen on the other: "
                     f"{chosen['a']} / {chosen['b']})")
    plots.histogram(candidates[chosen["a"]], out / "plots" / "sui_best_clean_vs_noisy.png", chosen["a"],
                    groups={"clean label": ~noisy, "flipped label": noisy},
                    title="sui's best detector (chosen on half a) for clean and flipped labels")
    write_parquet(out / "detection_scores.parquet", pa.table(
        {"sample_id": sample_id, "noisy": noisy, "half_a": half_a, **scores, **candidates, **real,
         "leverage": fit["leverage"], "train_loss_linearized": fit["train_loss"]}))
    return metrics


def real_network_baselines(cfg: Configs, sample_id: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The real network (data/model's w0, the training recipe) on the noisy training labels: training
    loss, EL2N, cleanlab's confident learning; and cleanlab's own issue set (None without it)."""
    if not np.isfinite(cfg.training.t):
        raise ParamError("detection.baselines", "real-network baselines need a finite training.t (steps to train)")
    steps = round(cfg.training.t)  # continuous dynamics: gradient flow for time lr·t ≈ t steps of lr
    train = read_split(cfg.input(paths.PREPARED).file("train.parquet"))
    if not np.array_equal(train.sample_id, sample_id):
        raise ArtifactError(f"{paths.PREPARED / 'train.parquet'}: samples do not match {paths.SCORES_FILE}")
    model, info = load_model(cfg.input(paths.MODEL).path)
    x = torch.as_tensor(train.x)
    y = torch.as_tensor(targets(train.label, train.num_classes))
    lr, wd = cfg.training.lr, cfg.training.weight_decay
    found, issues = {}, None
    if "loss" in cfg.detection.baselines:
        found["loss"] = baselines.training_loss(model, x, y, lr, steps, wd)
    if "el2n" in cfg.detection.baselines:
        arch = ModelConfig(arch=info["arch"], hidden=info["hidden"] or [], freeze=info.get("freeze") or [])
        build = baselines.seeded_builder(arch, info["input_shape"], info["num_outputs"])
        found["el2n"] = baselines.el2n(build, x, y, cfg.detection.el2n_seeds, lr, cfg.detection.el2n_steps, wd,
                                       progress=True)
    if "cleanlab" in cfg.detection.baselines:
        found["cleanlab"], issues = detection.out_of_fold_confident_learning(
            model, x, y, train.label, train.num_classes, cfg.detection.folds, cfg.detection.selection_seed,
            lr, steps, wd, progress="cleanlab folds")
    return found, issues


def why_fsi_is_less_precise(fsi: np.ndarray, fit: dict[str, np.ndarray], noisy: np.ndarray) -> dict:
    """Measured on all samples: F-SI ≈ leave-one-out loss × G (F-SI per unit of it). Which clean
    samples reach the top |flipped| of F-SI, and does G carry any label information?"""
    influence = fsi / np.maximum(fit["loo_loss"], 1e-300)
    top = np.zeros(len(fsi), bool)
    top[np.argsort(-fsi, kind="stable")[:noisy.sum()]] = True
    clean_top, clean = top & ~noisy, ~noisy
    return {"why_clean_in_top_fsi": int(clean_top.sum()),
            "why_spearman_fsi_loo_loss": float(spearmanr(fsi, fit["loo_loss"])[0]),
            "why_influence_auroc": detection_metrics(influence, noisy, [])["auroc"],
            **{f"why_median_{name}_{part}": float(np.median(values[mask]))
               for name, values in (("loo_loss", fit["loo_loss"]), ("influence", influence),
                                    ("leverage", fit["leverage"]))
               for part, mask in (("clean_in_top_fsi", clean_top), ("clean", clean), ("flipped", noisy))
               if mask.any()}}


def by_column(column: str, fsi: np.ndarray, values: np.ndarray, out) -> dict:
    """Mean F-SI per value of a column with several values (e.g. data sources, paper Fig. 2a) and a histogram."""
    masks = {name: values == name for name in sorted({v for v in values if v is not None})}
    if len(masks) < 2:
        return {}
    plots.histogram(fsi, out / "plots" / f"fsi_by_{column}.png", "F-SI (nats)", groups=masks,
                    title=f"F-SI by {column}")
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
    plots.histogram(fsi, out / "plots" / "fsi_adversarial.png", "F-SI (nats)",
                    groups={"original image": ~flag, "FGSM image": flag}, title="F-SI of adversarial examples")
    found = detection_metrics(fsi, flag, [])
    return {"n_adversarial": int(flag.sum()), "adversarial_fsi_auroc": found.get("auroc", float("nan")),
            "adversarial_fsi_ap": found.get("ap", float("nan")),
            "fsi_mean_adversarial": float(fsi[flag].mean()), "fsi_mean_not_adversarial": float(fsi[~flag].mean())}


def group_information(groups_file, out) -> dict:
    """Each group left out at once (loo.groups) beside the sum of its members' F-SI, and a bar plot."""
    rows = read_parquet(groups_file).to_pylist()
    if not rows:
        return {}
    plots.bars({f"{r['column']}={r['group']}": {"left out together": r["fsi_group"],
                                                  "sum of members' F-SI": r["fsi_members_sum"]} for r in rows},
               out / "plots" / "group_fsi.png", "F-SI (nats)", title="Group unique information", log=True)
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


app = stage_app("evaluate", __doc__, body, sections=["evaluate", "detection", "training", "jacobian", "summarization", "robustness"])

if __name__ == "__main__":
    app()
