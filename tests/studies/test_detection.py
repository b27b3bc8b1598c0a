"""Mislabel detection (sui_core.studies.detection) against explicit computations: leave-one-out retraining of
the linear model by plain gradient-descent loops, separate SGD trainings per fold, cleanlab's definition
of label quality; and the evaluate stage end to end on small real data."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sui_core.linearized.ntk import build_basis
from sui_core.linearized.reference import sgd_trained
from sui_core.linearized.solver import Recipe
from sui_core.studies import detection
from sui_core.studies.evaluation import detection_metrics, rare_subgroup_report


def gd_linear(phi, r, keep, lr, t):
    """t steps of full-batch SGD on the mean loss ½·mean‖Φv − r‖² over the kept samples, v0 = 0."""
    a, b = phi[keep].reshape(-1, phi.shape[2]), r[keep].reshape(-1)
    v = np.zeros(phi.shape[2])
    for _ in range(t):
        v -= lr * a.T @ (a @ v - b) / keep.sum()
    return v


@pytest.mark.parametrize("k", [1, 2])
def test_linearized_fit_matches_leave_one_out_gradient_descent(k):
    rng = np.random.default_rng(k)
    n, dim, lr, t = 10, 7, 0.3, 40
    phi, phi_val = rng.normal(size=(n, k, dim)), rng.normal(size=(6, k, dim))
    r = rng.normal(size=(n, k))
    basis = build_basis(lambda: [phi], lambda: [phi_val], n, k, dim)
    fsi, got = detection.linearized_fit(basis, r, Recipe(lr, 0.0, t, "discrete"))
    every = np.ones(n, bool)
    v = gd_linear(phi, r, every, lr, t)
    for i in range(n):
        keep = every.copy()
        keep[i] = False
        v_i = gd_linear(phi, r, keep, lr, t)
        dval = np.einsum("mkd,d->mk", phi_val, v - v_i)
        assert fsi[i] == pytest.approx((dval**2).sum() / (2 * 6), rel=1e-9)
        assert got["loo_loss"][i] == pytest.approx(0.5 * ((r[i] - phi[i] @ v_i) ** 2).sum(), rel=1e-9)
        assert got["train_loss"][i] == pytest.approx(0.5 * ((r[i] - phi[i] @ v) ** 2).sum(), rel=1e-9)
        # leverage: Σ_c ∂f_t,c(x_i)/∂y_i,c, how far the trained outputs on x_i follow its own targets (linear in r)
        moved = 0.0
        for c in range(k):
            bumped = r.copy()
            bumped[i, c] += 1.0
            moved += phi[i, c] @ (gd_linear(phi, bumped, every, lr, t) - v)
        assert got["leverage"][i] == pytest.approx(moved, rel=1e-9)


def test_sui_detectors_combine_the_quantities_as_documented():
    rng = np.random.default_rng(0)
    n, dim = 12, 9
    phi, phi_val = rng.normal(size=(n, 1, dim)), rng.normal(size=(5, 1, dim))
    r = rng.normal(size=(n, 1))
    basis = build_basis(lambda: [phi], lambda: [phi_val], n, 1, dim)
    recipe = Recipe(0.2, 0.0, 30, "discrete")
    assert [o.t for o in detection.other_lengths(recipe, [2.0, 0.5, 1.0])] == [15, 60]
    assert detection.other_lengths(Recipe(0.2, 0.1, float("inf"), "discrete"), [0.5]) == []
    at = {t: detection.linearized_fit(basis, r, Recipe(0.2, 0.0, t, "discrete")) for t in (15, 30, 60)}
    loss = rng.random(n)
    cands = detection.sui_detectors(*at[30], [at[15], at[60]], loss=loss)
    ratio = {t: fsi / fit["leverage"] for t, (fsi, fit) in at.items()}
    fsi, fit = at[30]
    np.testing.assert_allclose(cands["fsi"], fsi)
    np.testing.assert_allclose(cands["loo_loss"], fit["loo_loss"])
    np.testing.assert_allclose(cands["fsi_over_leverage"], ratio[30])
    np.testing.assert_allclose(cands["fsi_over_leverage_multi_t"], (ratio[15] * ratio[30] * ratio[60]) ** (1 / 3))
    np.testing.assert_allclose(cands["fsi_over_leverage_x_loo_loss"], ratio[30] * fit["loo_loss"])
    np.testing.assert_allclose(cands["fsi_over_leverage_x_train_loss"], ratio[30] * fit["train_loss"])
    np.testing.assert_allclose(cands["fsi_over_leverage_x_loss"], ratio[30] * loss)
    assert set(cands) == set(detection.SUI_DETECTORS) | set(detection.WITH_LOSS)
    assert set(detection.sui_detectors(fsi, fit)) == set(detection.SUI_DETECTORS)


def test_detector_is_chosen_on_the_selection_samples_only():
    n = 200
    selection = detection.selection_split(n, 0.5, seed=4)
    assert selection.sum() == 100
    np.testing.assert_array_equal(selection, detection.selection_split(n, 0.5, seed=4))
    flagged = np.arange(n) % 10 == 0
    rng = np.random.default_rng(1)
    good_on_selection = np.where(selection, flagged, rng.random(n))  # perfect there, noise elsewhere
    good_on_report = np.where(~selection, flagged, rng.random(n))
    cands = {"report": good_on_report.astype(float), "select": good_on_selection.astype(float)}
    assert detection.choose_detector(cands, flagged, selection) == "select"
    assert detection.choose_detector(cands, flagged, ~selection) == "report"


def test_cross_selection_reports_each_half_with_the_choice_of_the_other():
    n = 200
    half_a = detection.selection_split(n, 0.5, seed=1)
    flagged = np.arange(n) % 8 == 0
    rng = np.random.default_rng(3)
    cands = {
        "good_on_a": np.where(half_a, flagged, rng.random(n)),
        "good_on_b": np.where(~half_a, flagged, rng.random(n)),
    }
    baseline = {"noise": rng.random(n)}
    rows, folds, chosen = detection.cross_selected(cands, baseline, flagged, half_a, [0.1])
    assert chosen == {"a": "good_on_a", "b": "good_on_b"}
    on = {
        h: {name: detection_metrics(s[m], flagged[m], [0.1]) for name, s in (cands | baseline).items()}
        for h, m in (("a", half_a), ("b", ~half_a))
    }
    assert folds["a"]["sui_best"] == on["b"]["good_on_a"] and folds["b"]["sui_best"] == on["a"]["good_on_b"]
    for name in ("noise", "sui_best"):
        for key in ("auroc", "ap", "found_at_10pct"):
            assert rows[name][key] == pytest.approx((folds["a"][name][key] + folds["b"][name][key]) / 2)
    assert rows["noise"]["ap"] == pytest.approx((on["a"]["noise"]["ap"] + on["b"]["noise"]["ap"]) / 2)


def test_output_probabilities_and_stratified_folds():
    p = detection.output_probabilities(np.array([[-0.3], [0.25], [1.7]]), 2)
    np.testing.assert_allclose(p, [[1, 0], [0.75, 0.25], [0, 1]])
    p = detection.output_probabilities(np.array([[0.5, 1.5, -1.0], [-1.0, -2.0, -0.5]]), 3)
    np.testing.assert_allclose(p, [[1 / 3, 2 / 3, 0], [1 / 3, 1 / 3, 1 / 3]])
    labels = np.repeat([0, 1, 2], [30, 12, 7])
    fold = detection.fold_assignment(labels, 4, seed=0)
    for c in range(3):
        counts = np.bincount(fold[labels == c], minlength=4)
        assert counts.max() - counts.min() <= 1


def test_out_of_fold_outputs_equal_separate_sgd_trainings():
    from sui_core.config import ModelConfig
    from sui_core.network.models import build_model

    model = build_model(ModelConfig(hidden=[8], init_seed=3), [5], 1).double()
    x = torch.rand(15, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = (x.sum(1, keepdim=True) > 2.5).double()
    fold = np.arange(15) % 3
    got = detection.out_of_fold_outputs(model, x, y, fold, lr=0.1, steps=12)
    for i in range(3):
        keep = torch.as_tensor(fold != i)
        net = sgd_trained(model, x, y, 0.1, 12, keep=keep)
        with torch.no_grad():
            np.testing.assert_allclose(got[fold == i], net(x[~keep]).numpy(), rtol=1e-10, atol=1e-12)


def test_confident_learning_scores_are_cleanlabs_self_confidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = np.full((60, 3), 0.05)
    probs[np.arange(60), labels] = 0.9
    flipped = np.arange(60) < 6
    probs[flipped] = np.roll(probs[flipped], 1, axis=1)  # confident in another class
    score, issues = detection.confident_learning(labels, probs)
    np.testing.assert_allclose(score, 1 - probs[np.arange(60), labels])  # cleanlab's default: self-confidence
    np.testing.assert_array_equal(issues, flipped)


def test_rare_subgroup_report():
    score = np.array([1.0, 2.0, 3.0, 9.0, 8.0, 5.0, 5.0])
    label = np.array([0, 0, 0, 0, 0, 1, 1])
    group = np.array(["4", "4", "4", "7", "7", "9", None], dtype=object)
    got = rare_subgroup_report(score, label, group)
    assert got["mean_group_7"] == 8.5 and got["mean_group_4"] == 2.0 and got["mean_group_9"] == 5.0
    assert got["rare_group_7_auroc"] == 1.0 and len(got) == 4


@pytest.mark.slow
def test_evaluate_and_suspects_stages_end_to_end(tmp_path, monkeypatch):
    """Small real data with flips, a rare subclass and FGSM images; every baseline on, in evaluate and
    beside the suspects. The reported metrics are recomputed from the per-sample scores the stages write,
    fold by fold, and each flagged set from its scores and the prepared flips."""
    import pyarrow.parquet as pq
    import yaml
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    params = {
        "data": {
            "source": "sklearn_digits",
            "classes": [4, 9],
            "label_noise": 0.15,
            "max_train": 160,
            "subclass": {"into": 4, "add": 7, "fraction": 0.15},
            "adversarial": {"fraction": 0.1, "epsilon": 0.2, "hidden": 32, "steps": 50},
        },
        "model": {"hidden": [64]},
        "jacobian": {"dims_per_tensor": 200},
        "training": {"lr": 0.05, "t": 150},
        "loo": {"groups": ["label", "group"]},
        "detection": {"baselines": ["loss", "el2n", "cleanlab"], "folds": 3, "el2n_steps": 20, "el2n_seeds": [0, 1]},
        "suspects": {"baselines": ["loss", "el2n", "cleanlab"], "copies": 2},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for name in ("prepare", "model", "jacobians", "ntk", "loo", "score", "evaluate", "suspects"):
        result = CliRunner().invoke(importlib.import_module(f"stages.{name}").app, [])
        assert result.exit_code == 0, f"stage {name} failed:\n{result.output}\n{result.exception!r}"
    metrics = json.loads(Path("data/metrics/evaluate.json").read_text())
    scores = pq.read_table("data/scores/scores.parquet").to_pydict()
    per_sample = pq.read_table("data/evaluate/detection_scores.parquet").to_pydict()
    noisy, half_a = np.array(per_sample["noisy"]), np.array(per_sample["half_a"])
    np.testing.assert_allclose(per_sample["fsi"], scores["fsi"])
    for name in ("fsi", "loss", "el2n", "cleanlab", "fsi_over_leverage", "fsi_over_leverage_x_loss"):
        score = np.array(per_sample[name])
        on_b, on_a = (detection_metrics(score[half], noisy[half], []) for half in (~half_a, half_a))
        assert metrics[f"fold_a_{name}_ap"] == pytest.approx(on_b["ap"])  # fold a chooses on half a, reports b
        assert metrics[f"fold_b_{name}_auroc"] == pytest.approx(on_a["auroc"])
        assert metrics[f"report_{name}_ap"] == pytest.approx((on_a["ap"] + on_b["ap"]) / 2)
        assert on_a != on_b
    for fold, choose in (("a", half_a), ("b", ~half_a)):
        best = metrics[f"sui_best_{fold}"]
        assert best in detection.SUI_DETECTORS + detection.WITH_LOSS
        score = np.array(per_sample[best])
        ap_on = {
            c: detection_metrics(np.array(per_sample[c])[choose], noisy[choose], [])["ap"]
            for c in detection.SUI_DETECTORS + detection.WITH_LOSS
        }
        assert ap_on[best] == max(ap_on.values())  # chosen on its own half ...
        assert metrics[f"fold_{fold}_sui_best_ap"] == pytest.approx(  # ... reported on the other
            detection_metrics(score[~choose], noisy[~choose], [])["ap"]
        )
    fsi, group, adv = np.array(scores["fsi"]), np.array(scores["group"]), np.array(scores["adversarial"])
    assert metrics["fsi_mean_group_7"] == pytest.approx(fsi[group == "7"].mean())
    assert metrics["fsi_rare_group_7_auroc"] == pytest.approx(
        detection_metrics(fsi[group != "9"], group[group != "9"] == "7", [])["auroc"]
    )
    assert metrics["adversarial_fsi_auroc"] == pytest.approx(detection_metrics(fsi, adv, [])["auroc"])
    assert metrics["n_adversarial"] == round(0.1 * len(fsi))
    assert "group_fsi_group_7" in metrics and "group_members_fsi_sum_label_4" in metrics
    for plot in ("detection", "fsi_by_group", "fsi_adversarial", "group_fsi", "sui_best_clean_vs_noisy"):
        assert Path(f"data/evaluate/plots/{plot}.png").stat().st_size > 0
    assert Path("data/evaluate/detection.md").read_text().count("\n") == 2 + 14  # header + 14 methods
    # suspects: the same real-network baselines beside the suspicion, each flagged set measured on the flips
    found = json.loads(Path("data/metrics/suspects.json").read_text())
    table = pq.read_table("data/suspects/suspects.parquet").to_pydict()
    order = np.argsort(table["sample_id"])
    column = {name: np.array(values)[order] for name, values in table.items()}
    np.testing.assert_array_equal(column["sample_id"], per_sample["sample_id"])
    np.testing.assert_array_equal(column["known_error"], noisy)
    for name in ("loss", "el2n", "cleanlab"):
        np.testing.assert_allclose(column[name], per_sample[name], rtol=1e-6)
        flags = column[f"{name}_flagged"]
        if name == "cleanlab":
            assert flags.sum() == metrics["cleanlab_issues"]
        else:  # as many as sui flagged, the highest scores
            assert flags.sum() == found["flagged"] and column[name][flags].min() >= column[name][~flags].max()
        assert found[f"{name}_measured_precision"] == pytest.approx(noisy[flags].mean())
        assert found[f"{name}_measured_recall"] == pytest.approx(noisy[flags].sum() / noisy.sum())
        assert found[f"{name}_measured_ap"] == pytest.approx(detection_metrics(column[name], noisy, [])["ap"])
    sui_flags = column["flagged"]
    assert found["measured_precision"] == pytest.approx(noisy[sui_flags].mean())
    assert found["known_flips"] == noisy.sum()


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"baselines": ["loss", "forest"]}, "detection.baselines"),
        ({"selection_fraction": 1.0}, "detection.selection_fraction"),
        ({"t_factors": [0.0]}, "detection.t_factors"),
        ({"folds": 1}, "detection.folds"),
        ({"el2n_seeds": []}, "detection.el2n_seeds"),
        ({"el2n_steps": -1}, "detection.el2n_steps"),
    ],
)
def test_bad_detection_params_name_the_key(raw, key):
    from sui_core.config import load_section
    from sui_core.errors import ParamError

    with pytest.raises(ParamError, match=key.replace(".", r"\.")):
        load_section({"detection": raw}, "detection")
