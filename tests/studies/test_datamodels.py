"""The linear datamodeling score (sui_core.studies.datamodels) against independent computations: every
subset retrained by a plain torch.optim.SGD loop; on a model linear in its parameters (where the
linearization is the model) the exact group removal must reproduce those runs, the sum of single-sample
effects must not."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from sui_core.config import ModelConfig, ValidateConfig, from_dict
from sui_core.errors import ParamError
from sui_core.linearized.estimate import linearize
from sui_core.linearized.reference import sgd_trained
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.network.outputs import targets
from sui_core.studies.datamodels import DatamodelScore, datamodel_score, random_subsets, write_report
from sui_core.studies.validation import EXACT_KERNEL


def digits(n_train, n_val, classes=(4, 9), seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    pool = np.random.default_rng(seed).permutation(np.flatnonzero(np.isin(d.target, classes)))
    x = torch.tensor(d.data / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    label = np.searchsorted(classes, d.target)
    train, val = pool[:n_train], pool[n_train : n_train + n_val]
    return x[train], targets(label[train], len(classes)), x[val], label[val]


def score_of(model, x, y, x_val, val_label, recipe, m=8, fraction=0.5, seed=0):
    est = linearize(model, x, x_val, EXACT_KERNEL).estimate(y, recipe)
    residual = np.asarray(y, dtype=np.float64).reshape(est.f0.shape) - est.f0
    return datamodel_score(model, x, y, x_val, val_label, est.basis, residual, recipe, m, fraction, seed)


def sgd_outputs(model, x, y, x_val, val_label, kept, lr, steps, weight_decay=0.0):
    """(m, T) the labelled class's output (or the only one) of a plain SGD run on each subset."""
    rows = []
    for keep in kept:
        net = sgd_trained(model, x, torch.as_tensor(y), lr, steps, weight_decay, keep=torch.as_tensor(keep))
        with torch.no_grad():
            out = net(x_val).numpy()
        rows.append(out[:, 0] if out.shape[1] == 1 else out[np.arange(len(out)), val_label])
    return np.stack(rows)


@pytest.mark.parametrize("classes, weight_decay", [((4, 9), 0.0), ((1, 4, 9), 0.05)])
def test_group_removal_is_the_retrained_linear_model(classes, weight_decay):
    """A linear model is its own linearization: exact group removal gives every subset's real run to
    rounding (LDS 1), whereas adding up leave-one-out effects misses by far more than rounding."""
    x, y, x_val, val_label = digits(40, 15, classes)
    model = build_model(ModelConfig(hidden=[], init_seed=3), [1, 8, 8], y.shape[1]).double()
    recipe = Recipe(0.1, weight_decay, 60, "discrete")
    score = score_of(model, x, y, x_val, val_label, recipe)
    expected = sgd_outputs(model, x, y, x_val, val_label, score.kept, recipe.lr, 60, weight_decay)
    np.testing.assert_allclose(score.real, expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(score.predicted["group"], expected, rtol=1e-7, atol=1e-9)
    assert score.lds("group") == pytest.approx(1.0)
    spread = np.ptp(expected, axis=0).mean()  # how much the subsets move a target
    assert np.abs(score.predicted["additive"] - expected).mean() > 0.05 * spread
    assert score.kept.sum(1).tolist() == [20] * 8


@pytest.mark.slow
def test_group_removal_ranks_subsets_of_a_real_mlp():
    """A ReLU MLP trained briefly: its linearization's exact group removal ranks the subsets' real outputs
    (LDS over all targets) better than the sum of single-sample effects, and well."""
    x, y, x_val, val_label = digits(80, 30)
    model = build_model(ModelConfig(hidden=[256], init_seed=0), [1, 8, 8], 1).double()
    recipe = Recipe(0.05, 0.0, 100, "discrete")
    score = score_of(model, x, y, x_val, val_label, recipe, m=10)
    expected = sgd_outputs(model, x, y, x_val, val_label, score.kept, recipe.lr, 100)
    np.testing.assert_allclose(score.real, expected, rtol=1e-8, atol=1e-10)
    by_hand = np.nanmean([spearmanr(expected[:, t], score.predicted["group"][:, t])[0] for t in range(30)])
    assert score.lds("group") == pytest.approx(by_hand)
    assert score.lds("group") >= 0.9, score.lds("group")
    assert score.lds("group") > score.lds("additive"), (score.lds("group"), score.lds("additive"))


def test_subsets_are_seeded_and_of_the_asked_size():
    a, b = random_subsets(50, 6, 0.3, seed=1), random_subsets(50, 6, 0.3, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, random_subsets(50, 6, 0.3, seed=2))
    assert (a.sum(1) == 15).all() and len({row.tobytes() for row in a}) == 6
    with pytest.raises(ValueError, match="at least 2 subsets"):
        random_subsets(50, 1, 0.5, 0)
    with pytest.raises(ParamError, match="validate.lds_fraction"):
        from_dict(ValidateConfig, {"lds_fraction": 1.0}, "validate")
    with pytest.raises(ParamError, match="validate.lds_subsets"):
        from_dict(ValidateConfig, {"lds_subsets": 1}, "validate")


def test_report_rows_and_constant_targets(tmp_path):
    """Targets whose real output never moves have no rank correlation: left out of the mean and counted."""
    real = np.array([[1.0, 5.0, 2.0], [2.0, 5.0, 1.0], [3.0, 5.0, 3.0]])
    group = real + np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0]])
    additive = real[::-1].copy()
    kept = np.ones((3, 4), bool)
    kept[:, 0] = False
    score = DatamodelScore(
        kept, real, {"group": group, "additive": additive}, {"group": 0.1, "additive": 0.2, "retraining": 3.0}
    )
    assert score.targets == 2
    assert score.lds("group") == pytest.approx(1.0)
    assert score.lds("additive") == pytest.approx(np.mean([-1.0, spearmanr(real[::-1, 2], real[:, 2])[0]]))
    metrics = write_report(score, np.array([10, 11, 12, 13]), np.array([7, 8, 9]), tmp_path)
    assert metrics["lds_targets"] == 2 and metrics["lds_group"] == pytest.approx(1.0)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "lds.parquet").to_pydict()
    assert rows["target_id"] == [7, 8, 9] * 3 and rows["real"] == real.reshape(-1).tolist()
    members = pq.read_table(tmp_path / "lds_subsets.parquet").to_pydict()
    assert members["subset"] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and members["sample_id"] == [11, 12, 13] * 3
    assert (tmp_path / "plots" / "lds_per_target.png").stat().st_size > 1000
