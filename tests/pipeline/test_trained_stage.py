"""`loo.estimator: trained` through DVC: the loo stage's F-SI against really retraining the network of the
pipeline's own model folder without each of a few samples, on the pipeline's own prepared data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sui_core.data.splits import read_split
from sui_core.network.models import load_model, targets
from sui_core.network.training import predict, train_full_batch
from tests.pipeline_project import SMALL, make_project, run, stages_ran

pytestmark = pytest.mark.slow
LEFT_OUT = [0, 17, 60, 119]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    params = {**SMALL, "loo": {"estimator": "trained", "directions": 8}}
    project = make_project(tmp_path_factory.mktemp("sui-trained"), params)
    project.joinpath("repro.log").write_text(run(["dvc", "repro", "loo"], project))
    return project


def real_fsi(project: Path) -> np.ndarray:
    """Σ_j ‖f(x_j) − f₋ᵢ(x_j)‖² over the validation set, retraining the real network without each i."""
    model, _ = load_model(project / "data/model")
    train, val = (read_split(project / f"data/prepared/{s}.parquet") for s in ("train", "val"))
    x, x_val = torch.as_tensor(train.x), torch.as_tensor(val.x)
    y = torch.as_tensor(targets(train.label, train.num_classes)).to(x.dtype)
    weights = torch.ones(len(LEFT_OUT) + 1, len(x))
    weights[torch.arange(1, len(LEFT_OUT) + 1), torch.tensor(LEFT_OUT)] = 0
    params = train_full_batch(model, x, y, weights, SMALL["training"]["lr"], SMALL["training"]["t"])
    out = predict(model, params, x_val).double()
    return (out[1:] - out[0]).pow(2).sum((1, 2)).numpy()


def test_trained_estimator_runs_in_the_loo_stage_and_records_itself(project):
    assert stages_ran((project / "repro.log").read_text()) == [
        "prepare",
        "pretrain",
        "model",
        "jacobians",
        "ntk",
        "loo",
    ]
    meta = json.loads((project / "data/loo/meta.json").read_text())
    assert meta["params"]["loo.estimator"] == "trained"
    assert meta["trained"]["directions"] == 8 and 0 < meta["trained"]["captured"] <= 1


def test_trained_fsi_follows_real_retraining(project):
    """The real network, retrained without each of 4 samples: the trained F-SI is within 25 % of the real
    change for each (first order in 1/n at n = 120, plus the linearized remainder outside 8 directions)."""
    forms = pq.read_table(project / "data/loo/forms.parquet").to_pydict()
    estimate = np.asarray(forms["fsi_sum"])[LEFT_OUT]
    ratio = estimate / real_fsi(project)
    assert np.all(np.abs(ratio - 1) < 0.25), ratio
