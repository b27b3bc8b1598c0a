"""k = 10 outputs: the exact leave-one-out solver against from-scratch retraining, and the whole stage
chain on Fashion-MNIST with all ten classes."""

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from sui_core.linearized.ntk import build_basis
from sui_core.linearized.reference import brute_force_deltas
from sui_core.linearized.scores import SCORES
from sui_core.linearized.solver import Recipe, loo_deltas
from sui_core.network.outputs import num_outputs, targets

REL = 1e-8
K = 10
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist missing)",
)


def one_hot_problem(make_problem, n, dim, seed):
    """The shared random Jacobians with one-hot targets of K classes (minus a small f0) as the residual."""
    phi, _, phi_val = make_problem(n, K, dim, seed)
    rng = np.random.default_rng(seed + 1)
    return phi, targets(rng.integers(0, K, size=n), K) - 0.1 * rng.normal(size=(n, K)), phi_val


CASES = [
    # n, dim, weight_decay, t, dynamics, space
    (14, 80, 0.0, 400, "discrete", "primal"),  # D = 80 <= nk = 140
    (14, 300, 0.0, 400, "discrete", "kernel"),  # D = 300 > nk
    (12, 60, 1e-3, 3000, "continuous", "primal"),
    (12, 250, 1e-3, 3000, "continuous", "kernel"),
    (12, 200, 1e-2, math.inf, "continuous", "kernel"),  # converged ridge: Woodbury
]


@pytest.mark.parametrize("n,dim,weight_decay,t,dynamics,space", CASES)
def test_k10_every_delta_matches_brute_force(make_problem, n, dim, weight_decay, t, dynamics, space):
    assert num_outputs(K) == K
    phi, residual, phi_val = one_hot_problem(make_problem, n, dim, seed=n + dim)
    rows = phi.reshape(-1, dim)
    h_max = np.linalg.eigvalsh(rows.T @ rows).max()
    recipe = Recipe(lr=n / h_max, weight_decay=weight_decay, t=t, dynamics=dynamics)  # η·h_max = 1: stable
    full, left = recipe.full(n), recipe.left_out(n)
    basis = build_basis(lambda: np.array_split(phi, 3), lambda: [phi_val], n, K, dim)
    assert basis.space == space
    plan, blocks = loo_deltas(basis.s, basis.z, residual, full, left, block_size=5)
    deltas = np.concatenate([d for _, d in blocks])
    assert deltas.shape == (n, basis.rank) and np.all(np.isfinite(deltas))

    reference = brute_force_deltas(phi, residual, full, left, range(n))  # (n, D), retrained from scratch
    val_rows = phi_val.reshape(-1, dim)
    for i in range(n):
        dv = reference[i]
        want_train = rows @ dv
        got_train = basis.z.reshape(-1, basis.rank) @ deltas[i]
        err = np.linalg.norm(got_train - want_train) / np.linalg.norm(want_train)
        assert err <= REL, f"sample {i}: training-output change off by {err:.2e}"
        assert deltas[i] @ deltas[i] == pytest.approx(dv @ dv, rel=REL)
        assert deltas[i] @ basis.gram_val @ deltas[i] == pytest.approx(np.sum((val_rows @ dv) ** 2), rel=REL)


# ---- the stage chain on Fashion-MNIST, all ten classes ----

STAGES = ["prepare", "model", "jacobians", "ntk", "loo", "score", "evaluate"]
FASHION_PARAMS = {
    "data": {
        "source": "fashion_mnist",
        "classes": None,
        "max_train": 300,
        "val_fraction": 0.01,
        "label_noise": 0.1,
        "seed": 0,
    },
    "model": {"hidden": [64]},
    "jacobian": {"dims_per_tensor": 200, "batch_size": 64},
    "training": {"lr": 0.01, "t": 2000},
    "score": {"gallery_size": 4},
}


@pytest.mark.slow
@needs_fashion
def test_fashion_mnist_ten_classes_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    Path("params.yaml").write_text(yaml.safe_dump(FASHION_PARAMS))
    for name in STAGES:
        result = CliRunner().invoke(importlib.import_module(f"stages.{name}").app, [])
        assert result.exit_code == 0, f"stage {name} failed:\n{result.output}\n{result.exception!r}"

    manifest = json.loads(Path("data/jacobians/manifest.json").read_text())
    assert manifest["k"] == K
    prepared = json.loads(Path("data/prepared/meta.json").read_text())
    assert prepared["summary"]["num_classes"] == K and prepared["summary"]["n_train"] == 300
    scores = pq.read_table("data/scores/scores.parquet").to_pydict()
    assert len(scores["fsi"]) == 300
    for name in SCORES:
        values = np.asarray(scores[name], dtype=float)
        assert np.all(np.isfinite(values)) and np.all(values >= 0), name
    # the loo stage's fit of each sample: leverage = Σ_c of hat-matrix diagonals of GD from w0, each in [0, 1]
    leverage = np.asarray(scores["leverage"])
    assert np.all((leverage > 0) & (leverage <= K))
    assert np.all(np.asarray(scores["loo_loss"]) >= 0) and np.all(np.asarray(scores["train_loss"]) >= 0)
    fsi, noisy = np.asarray(scores["fsi"]), np.asarray(scores["noisy"])
    assert noisy.sum() == 30
    assert fsi[noisy].mean() > fsi[~noisy].mean()
    metrics = json.loads(Path("data/metrics/evaluate.json").read_text())
    assert metrics["n_noisy"] == 30 and 0.5 < metrics["fsi_auroc"] <= 1
