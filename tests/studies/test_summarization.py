"""Data summarization (sui_core.studies.summarization): removal orders against hand-checked cases and
independent recomputation (fresh Jacobians on the kept subset, plain SGD loops for the retraining)."""

import numpy as np
import pytest
import torch

from sui_core.config import JacobianConfig, ModelConfig, SummarizationConfig
from sui_core.linearized.estimate import estimate_from_jacobians, projected_jacobians, unique_information
from sui_core.linearized.reference import sgd_trained
from sui_core.linearized.solver import Recipe
from sui_core.studies.baselines import el2n, seeded_builder
from sui_core.studies.summarization import (
    accuracy,
    accuracy_drops,
    curves,
    iterative_removal,
    removal_counts,
    retrained_accuracy,
    summarize,
)

SHAPE = [1, 4, 4]


def nearest_gap(points):
    """A score that depends on what is kept: distance to the nearest other kept point."""

    def rescore(kept):
        p = points[kept]
        d = np.abs(p[:, None] - p[None, :]) + np.diag(np.full(len(p), np.inf))
        return d.min(1)

    return rescore


def test_iterative_removal_rescores_after_each_step():
    points = np.array([0.0, 0.1, 0.2, 5.0, 5.05, 9.0])
    # by hand: gaps .1 .1 .1 .05 .05 4 -> drop 3 (first lowest); then gaps .1 .1 .1 4.85 3.95 -> drop 0
    kept = iterative_removal(nearest_gap(points), 6, [0, 2], step=1)
    assert kept[0].tolist() == list(range(6))
    assert kept[2].tolist() == [1, 2, 4, 5]
    # one-shot removal of the two lowest would drop both 5.0 and 5.05 instead
    once = np.argsort(nearest_gap(points)(np.arange(6)), kind="stable")[2:]
    assert sorted(once.tolist()) == [0, 1, 2, 5]


def test_iterative_removal_meets_counts_that_are_not_multiples_of_the_step():
    calls = []

    def rescore(kept):
        calls.append(len(kept))
        return kept.astype(float)  # lowest index first

    kept = iterative_removal(rescore, 10, [3, 0, 4], step=2)
    assert calls == [10, 8, 7]  # remove 2, then 1 to reach 3, then 1 to reach 4
    assert kept[3].tolist() == list(range(3, 10)) and kept[4].tolist() == list(range(4, 10))


def test_rescoring_a_subset_from_the_full_jacobians_equals_scoring_it_from_scratch():
    torch.manual_seed(0)
    model = seeded_builder(ModelConfig(hidden=[12]), SHAPE, 1, double=True)(3)
    x, x_val = torch.rand(20, *SHAPE, dtype=torch.float64), torch.rand(7, *SHAPE, dtype=torch.float64)
    y = (torch.arange(20) % 2).double()[:, None].numpy()
    recipe, cfg = Recipe(0.3, 0.0, 40, "discrete"), JacobianConfig(projection="none")
    f0, phi = projected_jacobians(model, x, cfg)
    _, phi_val = projected_jacobians(model, x_val, cfg)
    kept = np.array([0, 2, 3, 7, 8, 11, 12, 15, 19])
    got = estimate_from_jacobians(f0[kept], phi[kept], phi_val, y[kept], recipe).scores["fsi"]
    want = unique_information(model, x[kept], y[kept], x_val, recipe, cfg).scores["fsi"]
    np.testing.assert_allclose(got, want, rtol=1e-8)


def sgd_accuracy(model, x, y, kept, x_test, labels, lr, steps):
    net = sgd_trained(model, x, y, lr, steps, keep=kept)
    with torch.no_grad():
        out = net(x_test)
    pred = (out[:, 0] > 0.5).long() if out.shape[1] == 1 else out.argmax(1)
    return float((pred.numpy() == labels).mean())


def test_retrained_accuracy_is_sgd_on_the_kept_rows_only():
    torch.manual_seed(1)
    model = seeded_builder(ModelConfig(hidden=[10]), SHAPE, 3, double=True)(0)
    x, x_test = torch.rand(15, *SHAPE, dtype=torch.float64), torch.rand(30, *SHAPE, dtype=torch.float64)
    y = torch.eye(3, dtype=torch.float64)[torch.arange(15) % 3]
    labels = np.arange(30) % 3
    kept = np.array([0, 1, 4, 5, 9, 14])
    got = retrained_accuracy(model, x, y, kept, x_test, labels, Recipe(0.5, 0.0, 20, "discrete"))
    assert got == sgd_accuracy(model, x, y, kept, x_test, labels, 0.5, 20)


def test_accuracy_thresholds_one_output_and_argmaxes_several():
    assert accuracy(torch.tensor([[0.2], [0.7], [0.51]]), np.array([0, 0, 1])) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([[0.1, 0.8, 0.1], [0.5, 0.2, 0.3]]), np.array([1, 2])) == 0.5


def test_summarize_removes_by_each_order_and_retrains_from_the_seeds_w0():
    gen = torch.Generator().manual_seed(5)
    n = 20
    x, x_val = torch.rand(n, *SHAPE, generator=gen), torch.rand(6, *SHAPE, generator=gen)
    x_test = torch.rand(40, *SHAPE, generator=gen)
    labels = (torch.arange(n) % 2).numpy()
    y = labels[:, None].astype(np.float64)
    test_labels = np.arange(40) % 2
    cfg, jac = ModelConfig(hidden=[8]), JacobianConfig(projection="none")
    build = seeded_builder(cfg, SHAPE, 1)
    recipe = Recipe(0.2, 0.0, 15, "discrete")
    settings = SummarizationConfig(
        fractions=[0.0, 0.5], strategies=["fsi_bottom", "random", "el2n"], seeds=[0, 4], score_inits=2, el2n_steps=3
    )
    rows = summarize(build, x, y, x_val, x_test, test_labels, recipe, jac, settings, progress=False)
    assert len(rows) == 2 * 3 * 2
    for seed in settings.seeds:
        model = build(seed)
        by = {(r["strategy"], r["fraction"]): r["accuracy"] for r in rows if r["seed"] == seed}
        assert len({by[(s, 0.0)] for s in settings.strategies}) == 1  # nothing removed: one training
        fsi = unique_information(model, x, y, x_val, recipe, jac).scores["fsi"]  # fresh Jacobians
        orders = {
            "fsi_bottom": np.argsort(fsi, kind="stable"),
            "random": np.random.default_rng(seed).permutation(n),
            "el2n": np.argsort(el2n(build, x, y, [1000 * (seed + 1), 1000 * (seed + 1) + 1], 0.2, 3), kind="stable"),
        }
        for name, order in orders.items():
            kept = np.sort(order[n // 2 :])
            want = sgd_accuracy(
                build(seed), x, torch.tensor(y, dtype=torch.float32), kept, x_test, test_labels, 0.2, 15
            )
            assert by[(name, 0.5)] == pytest.approx(want, abs=1 / 40 + 1e-9), name  # float32 ties at 0.5 may flip one


def test_curves_and_drops_by_hand():
    rows = [
        {"strategy": s, "fraction": f, "accuracy": a, "seed": i}
        for s, f, accs in [("random", 0.0, [0.9, 0.8]), ("random", 0.5, [0.7, 0.6])]
        for i, a in enumerate(accs)
    ]
    table = curves(rows)
    assert [(r["strategy"], r["fraction"]) for r in table] == [("random", 0.0), ("random", 0.5)]
    assert table[0]["mean"] == pytest.approx(0.85) and table[0]["std"] == pytest.approx(np.sqrt(0.005))
    assert accuracy_drops(table) == {"random_drop_at_50pct": pytest.approx(20.0)}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="fractions"):
        removal_counts(10, [0.0, 0.96])
    with pytest.raises(ValueError, match="step"):
        iterative_removal(lambda kept: kept, 5, [2], step=0)
    with pytest.raises(ValueError, match="unknown strategies"):
        summarize(
            None,
            torch.zeros(4, 1),
            np.zeros((4, 1)),
            None,
            None,
            None,
            None,
            None,
            SummarizationConfig(True, [0.0], ["bottom"], [0]),
            progress=False,
        )


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"fractions": [0.1, 0.5]}, "fractions"),
        ({"fractions": [0.0, 1.0]}, "fractions"),
        ({"strategies": ["bottom"]}, "strategies"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"iterative_step": 0}, "iterative_step"),
        ({"enabled": "yes"}, "enabled"),
        ({"el2n_steps": -1}, "el2n_steps"),
    ],
)
def test_bad_params_name_the_key(raw, key):
    from sui_core.config import load_section
    from sui_core.errors import ParamError

    with pytest.raises(ParamError, match=f"summarization.{key}"):
        load_section({"summarization": raw}, "summarization")
