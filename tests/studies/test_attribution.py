"""Per-prediction attribution (sui_core.studies.attribution) against explicit retraining: a linear model
f(x) = f0(x) + Φ(x)v trained by a plain gradient-descent loop (mean loss, weight decay towards v = 0) on
all samples and again without each one; the effect on every target is the difference of the two
models' predictions, the proponents and opponents are read off those differences by sorting."""

import numpy as np
import pytest

from sui_core.linearized.ntk import build_basis, val_rows_from_cross
from sui_core.linearized.solver import Recipe
from sui_core.studies import attribution


def gd(phi, r, keep, lr, t, weight_decay):
    """t full-batch steps of SGD with `lr` and `weight_decay` on ½·mean‖Φv − r‖² over the kept samples."""
    a, b = phi[keep].reshape(-1, phi.shape[2]), r[keep].reshape(-1)
    v = np.zeros(phi.shape[2])
    for _ in range(t):
        v -= lr * (a.T @ (a @ v - b) / keep.sum() + weight_decay * v)
    return v


@pytest.mark.parametrize(("k", "dim", "weight_decay"), [(1, 9, 0.0), (2, 7, 0.0), (1, 30, 0.05), (3, 40, 0.02)])
def test_effects_and_proponents_match_retraining_without_each_sample(k, dim, weight_decay):
    rng = np.random.default_rng(k * 100 + dim)
    n, m, lr, t = 14, 5, 0.2, 60
    phi, phi_t = (rng.normal(size=(size, k, dim)) * 3 / np.sqrt(dim) for size in (n, m))  # lr·h_max < 2
    r, f0_t = rng.normal(size=(n, k)), rng.normal(size=(m, k)) * 0.3 + 0.5
    basis = build_basis(lambda: [phi], lambda: [phi_t], n, k, dim)  # primal (dim < nk) or kernel space
    cross = phi_t.reshape(m * k, dim) @ phi.reshape(n * k, dim).T
    rows = val_rows_from_cross(cross, basis.z, basis.s)
    recipe = Recipe(lr, weight_decay, t, "discrete")
    stored = {}
    got = attribution.attribute(
        basis, r, f0_t, rows, recipe, top=3, block_size=4, on_block=lambda start, a: stored.update({start: a})
    )
    every = np.ones(n, bool)
    v = gd(phi, r, every, lr, t, weight_decay)
    prediction = f0_t + phi_t @ v
    np.testing.assert_allclose(got.prediction, prediction, rtol=1e-9, atol=1e-12)
    effect = np.empty((n, m, k))
    for i in range(n):
        keep = every.copy()
        keep[i] = False
        effect[i] = phi_t @ (v - gd(phi, r, keep, lr, t, weight_decay))  # f_t(x_t) − f₋ᵢ(x_t)
    np.testing.assert_allclose(np.concatenate([stored[s] for s in sorted(stored)]), effect, rtol=1e-8, atol=1e-12)
    predicted = (prediction[:, 0] > 0.5).astype(int) if k == 1 else prediction.argmax(1)
    for j in range(m):
        sup = effect[:, j, 0] * (1 if predicted[j] else -1) if k == 1 else effect[:, j, predicted[j]]
        order = np.argsort(-sup)
        np.testing.assert_array_equal(got.proponents[j], order[:3])
        np.testing.assert_array_equal(got.opponents[j], order[::-1][:3])
        np.testing.assert_allclose(got.proponent_support[j], sup[order[:3]], rtol=1e-8, atol=1e-12)
    # leaving every sample out returns the model to v = 0: the joint effect is f_t − f0, exactly
    np.testing.assert_allclose(got.joint, phi_t @ v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.effect_sum, effect.sum(0), rtol=1e-8, atol=1e-12)
    assert not np.allclose(got.additivity, 1.0)  # unique information does not add up


def test_support_follows_the_predicted_class():
    effect = np.array([[[0.3], [-0.2]], [[-0.1], [0.4]]])  # (B=2, m=2, k=1)
    np.testing.assert_array_equal(attribution.support(effect, np.array([1, 0])), [[0.3, 0.2], [-0.1, -0.4]])
    multi = np.arange(12.0).reshape(2, 2, 3)
    np.testing.assert_array_equal(attribution.support(multi, np.array([2, 0])), [[2.0, 3.0], [8.0, 9.0]])
    np.testing.assert_array_equal(attribution.predicted_class(np.array([[0.6], [0.4]])), [1, 0])


@pytest.mark.parametrize("projection, split", [("none", "val"), ("exact", "val"), ("none", "test"), ("exact", "test")])
def test_attribute_stage_matches_retraining_the_linearized_network(tmp_path, monkeypatch, projection, split):
    """The stage on real digits (full Jacobians, or the exact kernel from layer factors) against a
    gradient-descent loop on the network's own Jacobians at w0 (torch.func.jacrev, float64), retrained
    without each training sample, for validation targets (rows in the basis) and test targets (their
    Jacobians taken by the stage); then `sui explain` prints what the stage found."""
    import importlib
    import json
    from pathlib import Path

    import pyarrow.parquet as pq
    import torch
    import yaml
    from torch.func import functional_call, jacrev
    from typer.testing import CliRunner

    from stages.cli import app as cli
    from sui_core.data.splits import read_split
    from sui_core.network.models import load_model
    from sui_core.network.outputs import targets
    from sui_core.network.training import trainable

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    lr, t, wd = 0.05, 100, 0.01
    params = {
        "data": {"source": "sklearn_digits", "classes": [3, 8], "max_train": 40, "label_noise": 0.0},
        "model": {"hidden": [16]},
        "jacobian": {"projection": projection},
        "training": {"lr": lr, "t": t, "weight_decay": wd},
        "attribute": {"enabled": True, "top": 3, "gallery_targets": 2, "split": split},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for name in ("prepare", "model", "jacobians", "ntk", "attribute"):
        result = CliRunner().invoke(importlib.import_module(f"stages.{name}").app, [])
        assert result.exit_code == 0, f"stage {name} failed:\n{result.output}\n{result.exception!r}"
    train, val = (read_split(f"data/prepared/{name}.parquet") for name in ("train", split))  # val: the targets
    model = load_model("data/model")[0].double().eval()
    weights = {name: p.detach() for name, p in trainable(model).items()}

    def jacobian(x):
        out = jacrev(lambda w: functional_call(model, w, (x,)))(weights)  # (m, k, *shape) per tensor
        flat = torch.cat([j.reshape(len(x), j.shape[1], -1) for j in out.values()], 2)
        return functional_call(model, weights, (x,)).detach().numpy(), flat.numpy()

    f0, phi = jacobian(torch.as_tensor(train.x, dtype=torch.float64))
    f0_val, phi_val = jacobian(torch.as_tensor(val.x, dtype=torch.float64))
    r = targets(train.label, train.num_classes) - f0
    every = np.ones(len(train), bool)
    v = gd(phi, r, every, lr, t, wd)
    effect = np.stack(
        [phi_val @ (v - gd(phi, r, every & (np.arange(len(train)) != i), lr, t, wd)) for i in every.nonzero()[0]]
    )
    stored = pq.read_table("data/attribution/effects.parquet")
    matrix = np.stack(stored.column("effect").to_numpy(zero_copy_only=False)).reshape(effect.shape)
    np.testing.assert_array_equal(stored.column("sample_id").to_numpy(), train.sample_id)
    np.testing.assert_allclose(matrix, effect, rtol=2e-3, atol=2e-4 * np.abs(effect).max())
    table = pq.read_table("data/attribution/influences.parquet").to_pydict()
    prediction = f0_val + phi_val @ v
    np.testing.assert_allclose(np.array(table["prediction"]), prediction, atol=1e-4)
    predicted = (prediction[:, 0] > 0.5).astype(int)
    row = {int(i): j for j, i in enumerate(train.sample_id)}
    for j in range(len(val)):
        sup = effect[:, j, 0] * (1 if predicted[j] else -1)
        got = np.array(table["proponent_support"][j])
        np.testing.assert_allclose(got, np.sort(sup)[::-1][:3], rtol=2e-3, atol=2e-4 * np.abs(sup).max())
        np.testing.assert_allclose(sup[[row[i] for i in table["proponent_id"][j]]], got, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(table["effect_sum"][j], effect[:, j].sum(0), rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(table["joint_effect"][j], phi_val[j] @ v, rtol=1e-3, atol=1e-5)
    assert json.loads(Path("data/metrics/attribute.json").read_text())["targets"] == len(val)
    assert Path("data/attribution/plots/attribution_gallery.png").stat().st_size > 5_000
    target = int(table["target_id"][0])
    printed = CliRunner().invoke(cli, ["explain", str(target), "--n", "2"])
    assert printed.exit_code == 0, printed.output
    lines = printed.output.splitlines()
    assert lines[0].startswith(
        f"{'validation' if split == 'val' else 'test'} sample {target}: label {table['label'][0]}"
    )
    assert lines[5].split()[:2] == ["1", str(table["proponent_id"][0][0])]
    missing = CliRunner().invoke(cli, ["explain", "999999"])
    assert missing.exit_code == 1 and "not among the" in missing.output

    # --verify: the real network without the top proponent, against a plain loop of the recipe's steps
    verified = CliRunner().invoke(cli, ["explain", str(target), "--n", "1", "--verify"])
    assert verified.exit_code == 0, verified.output
    line = verified.output.splitlines()[-1]
    assert line.startswith(f"verify: the real network retrained without {table['proponent_id'][0][0]} ({t} steps)")
    real = float(line.split("support ")[1].split(",")[0])
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(targets(train.label, 2))
    outputs = []
    for keep in (every, every & (np.arange(len(train)) != row[table["proponent_id"][0][0]])):
        w = {name: p.clone().requires_grad_(True) for name, p in weights.items()}
        for _ in range(t):  # SGD on ½·mean‖f − y‖² over the kept samples, weight decay towards w0
            loss = 0.5 * ((functional_call(model, w, (x[keep],)) - y[keep]) ** 2).sum(1).mean()
            grads = torch.autograd.grad(loss, list(w.values()))
            with torch.no_grad():
                for (name, p), g in zip(w.items(), grads):
                    p -= lr * (g + wd * (p - weights[name]))
        outputs.append(functional_call(model, w, (torch.as_tensor(val.x[:1], dtype=torch.float64),)).detach()[0, 0])
    sign = 1.0 if table["predicted"][0] == str(train.class_names[1]) else -1.0
    assert abs(real) > 1e-3 and real == pytest.approx(sign * float(outputs[0] - outputs[1]), rel=0.02)  # f32 vs f64
