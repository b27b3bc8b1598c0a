"""The validate stage's library (sui_core.studies.validation) and the pretrained setting, each against an
independent computation: torch.optim.SGD loops, closed-form ridge regression, an explicit solve."""

import copy

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from sui_core.config import DataConfig, ModelConfig, PretrainConfig, ValidateConfig, from_dict
from sui_core.errors import ParamError
from sui_core.linearized.ntk import build_basis
from sui_core.linearized.reference import sgd_trained
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model, head_names
from sui_core.network.outputs import targets
from sui_core.studies.validation import (
    FlatNetwork,
    influence_exact,
    influence_lissa,
    retrain,
    sample_left_out,
    validate,
)


def digits(n_train, n_val, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    pool = np.random.default_rng(seed).permutation(np.flatnonzero(np.isin(d.target, (4, 9))))
    x = torch.tensor(d.data / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = targets((d.target == 9).astype(np.int64), 2)
    train, val = pool[:n_train], pool[n_train : n_train + n_val]
    return x[train], torch.tensor(y[train]), x[val]


def test_retrain_equals_separate_sgd_runs():
    x, y, x_val = digits(30, 10)
    model = build_model(ModelConfig(hidden=[16], init_seed=1), [1, 8, 8], 1).double()
    left_out = np.array([3, 17, 29])
    lr, steps = 0.3, 20
    got = retrain(model, x, y, x_val, left_out, lr, steps, checkpoint_step=8)
    full = sgd_trained(model, x, y, lr, steps)
    w_full = torch.cat([p.detach().flatten() for p in full.parameters()])
    for row, i in enumerate(left_out):
        net = sgd_trained(model, x, y, lr, steps, keep=np.arange(30) != i)
        w = torch.cat([p.detach().flatten() for p in net.parameters()])
        with torch.no_grad():
            moved = ((full(x_val) - net(x_val)) ** 2).sum()
        np.testing.assert_allclose(got.changes.weights[row], float(((w - w_full) ** 2).sum()), rtol=1e-8)
        np.testing.assert_allclose(got.changes.predictions[row], float(moved), rtol=1e-8)
    early = sgd_trained(model, x, y, lr, 8)
    for name, p in early.named_parameters():
        np.testing.assert_allclose(got.checkpoint[name].numpy(), p.detach().numpy(), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(got.loss_end, float(0.5 * ((full(x) - y) ** 2).sum(-1).mean()), rtol=1e-10)


def test_float32_retraining_resolves_the_changes():
    """The leave-one-out differences are far above float32 round-off: float32 retraining agrees with float64."""
    x, y, x_val = digits(100, 40)
    model = build_model(ModelConfig(hidden=[256], init_seed=0), [1, 8, 8], 1)
    left_out = np.array([0, 10, 50, 99])
    lo = retrain(model, x.float(), y.float(), x_val.float(), left_out, 0.05, 30)
    hi = retrain(copy.deepcopy(model).double(), x, y, x_val, left_out, 0.05, 30)
    np.testing.assert_allclose(lo.changes.weights, hi.changes.weights, rtol=1e-3)
    np.testing.assert_allclose(lo.changes.predictions, hi.changes.predictions, rtol=1e-3)


def test_influence_exact_matches_leave_one_out_of_ridge_regression():
    """A model linear in w trained to convergence (ridge towards w0): IF with the exact Hessian must match
    exact leave-one-out retraining up to O(1/n) relative (leverage; here n = 1000: about 1 %)."""
    n, d, lam = 1000, 6, 0.1
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(n, 1, 2, 3)))
    y = torch.tensor(rng.normal(size=(n, 1)))
    x_val = torch.tensor(rng.normal(size=(15, 1, 2, 3)))
    model = build_model(ModelConfig(hidden=[], init_seed=0), [1, 2, 3], 1).double()
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    a = np.hstack([x.reshape(n, d).numpy(), np.ones((n, 1))])  # [weight, bias] columns
    v0 = np.concatenate([w0["1.weight"].numpy().ravel(), w0["1.bias"].numpy()])

    def ridge(rows):  # argmin ½·mean(a v − y)² + ½λ‖v − v0‖²
        ar, yr = a[rows], y.numpy()[rows, 0]
        return np.linalg.solve(ar.T @ ar / len(rows) + lam * np.eye(d + 1), ar.T @ yr / len(rows) + lam * v0)

    v = ridge(np.arange(n))
    params = {"1.weight": torch.tensor(v[:d]).reshape(1, d), "1.bias": torch.tensor(v[d:])}
    net = FlatNetwork(model, params, w0, lam)
    left_out = np.array([0, 5, 77, 150, 999])
    est = influence_exact(net, x, y, x_val, left_out, damping=0.0)
    a_val = np.hstack([x_val.reshape(15, d).numpy(), np.ones((15, 1))])
    real_w, real_f = [], []
    for i in left_out:
        delta = v - ridge(np.arange(n) != i)
        real_w.append(delta @ delta)
        real_f.append(((a_val @ delta) ** 2).sum())
    np.testing.assert_allclose(est.weights, real_w, rtol=0.03)
    np.testing.assert_allclose(est.predictions, real_f, rtol=0.03)


@pytest.mark.parametrize("weight_decay, damping", [(0.0, 0.25), (2.0, 0.0)])
def test_lissa_converges_to_the_exact_solve(weight_decay, damping):
    """Full-batch LiSSA's fixed point is (H + damping·scale·I)⁻¹ g / n (the module docstring)."""
    x, y, x_val = digits(40, 10)
    model = build_model(ModelConfig(hidden=[6], init_seed=0), [1, 8, 8], 1).double()
    trained = retrain(model, x, y, x_val, np.array([0]), 0.3, 30).params
    w0 = {k: p.detach() for k, p in model.named_parameters()}
    net = FlatNetwork(model, trained, w0, weight_decay)
    h = torch.func.hessian(lambda th: net.loss(th, x, y))(net.theta)
    scale = 1.1 * float(torch.linalg.eigvalsh(h).abs().max())
    left_out = np.array([1, 20, 39])
    lissa = influence_lissa(net, x, y, x_val, left_out, depth=80, scale=scale, damping=damping, batch_size=40, seed=0)
    exact = influence_exact(net, x, y, x_val, left_out, damping=damping * scale)
    np.testing.assert_allclose(lissa.weights, exact.weights, rtol=1e-4)
    np.testing.assert_allclose(lissa.predictions, exact.predictions, rtol=1e-4)


def test_build_basis_from_float32_blocks_equals_float64():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(12, 2, 50)).astype(np.float32)
    phi_val = rng.normal(size=(5, 2, 50)).astype(np.float32)
    lo = build_basis(lambda: np.array_split(phi, 3), lambda: [phi_val], 12, 2, 50)
    hi = build_basis(lambda: [phi.astype(np.float64)], lambda: [phi_val.astype(np.float64)], 12, 2, 50)
    assert lo.space == hi.space == "kernel"
    np.testing.assert_allclose(lo.s, hi.s, rtol=1e-12)
    np.testing.assert_allclose(np.abs(lo.z), np.abs(hi.z), atol=1e-10)  # eigenvectors up to sign
    np.testing.assert_allclose(
        lo.z.reshape(24, -1) @ lo.gram_val @ lo.z.reshape(24, -1).T,
        hi.z.reshape(24, -1) @ hi.gram_val @ hi.z.reshape(24, -1).T,
        rtol=1e-10,
        atol=1e-10,
    )


def test_sample_left_out_is_seeded_and_distinct():
    a = sample_left_out(100, 20, seed=3)
    assert len(set(a.tolist())) == 20 and np.array_equal(a, sample_left_out(100, 20, seed=3))
    assert not np.array_equal(a, sample_left_out(100, 20, seed=4))


def test_validate_params_are_checked():
    with pytest.raises(ParamError, match="validate.samples"):
        from_dict(ValidateConfig, {"samples": 0}, "validate")
    with pytest.raises(ParamError, match="validate.influence"):
        from_dict(ValidateConfig, {"influence": ["cg"]}, "validate")
    with pytest.raises(ParamError, match="validate.checkpoint_fraction"):
        from_dict(ValidateConfig, {"checkpoint_fraction": 1.0}, "validate")
    with pytest.raises(ParamError, match="model.pretrain"):
        from_dict(ModelConfig, {"pretrain": True, "init_path": "w.pt"}, "model")


def test_pretrained_body_with_a_fresh_head(tmp_path):
    """model.pretrain: the body is the pretrained network's, the head the seeded init of a fresh model."""
    from sui_core.network.pretrain import pretrain

    cfg = ModelConfig(hidden=[16], init_seed=7)
    data = DataConfig(source="sklearn_digits", classes=[4, 9])
    with pytest.raises(ParamError, match="pretrain.classes"):
        pretrain(cfg, PretrainConfig(source="sklearn_digits", classes=[1, 4], epochs=1), data)
    net, info = pretrain(cfg, PretrainConfig(source="sklearn_digits", classes=[0, 1, 2], epochs=3), data)
    assert info["pretrain_accuracy"] > 0.9  # it learned the disjoint task
    torch.save(net.state_dict(), tmp_path / "body.pt")
    model = build_model(
        ModelConfig(hidden=[16], init_seed=7, init_path=str(tmp_path / "body.pt"), pretrained_body=True), [1, 8, 8], 1
    )
    fresh = build_model(cfg, [1, 8, 8], 1)
    head = head_names("mlp", [16], (1, 8, 8), 1)
    trained = dict(net.named_parameters())
    for name, p in model.named_parameters():
        expected = dict(fresh.named_parameters())[name] if name in head else trained[name]
        assert torch.equal(p, expected), name


@pytest.mark.slow
def test_linearization_tracks_retraining_of_a_wide_network():
    """End to end: a wide MLP (64-2048-1, float64) trained briefly stays close to its linearization, so
    sui's estimates must correlate with real retraining (as in tests/network/test_real_training.py); influence
    functions and the checkpoint variant must run and give finite correlations."""
    x, y, x_val = digits(120, 60)
    model = build_model(ModelConfig(hidden=[2048], init_seed=0), [1, 8, 8], 1).double()
    result = validate(
        model,
        x,
        y.numpy(),
        x_val,
        Recipe(0.01, 0.0, 100, "discrete"),
        m=8,
        seed=0,
        influence=("exact", "lissa"),
        lissa_depth=20,
        lissa_scale=100.0,
        checkpoint_fraction=0.5,
    )
    rows = {row["method"]: row for row in result.table()}
    assert set(rows) == {"sui", "sui_checkpoint", "if_lissa"}
    assert result.notes and "if_exact skipped" in result.notes[0]
    assert rows["sui"]["pearson_predictions"] >= 0.99, rows["sui"]
    assert rows["sui"]["spearman_predictions"] >= 0.9, rows["sui"]
    assert 0.8 <= rows["sui"]["median_ratio_predictions"] <= 1.25, rows["sui"]
    assert pearsonr(result.estimates["sui"].weights, result.truth.changes.weights)[0] >= 0.9
    assert all(np.isfinite(v) for row in rows.values() for v in row.values() if isinstance(v, float))
