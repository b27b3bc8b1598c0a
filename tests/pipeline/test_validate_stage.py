"""The validate stage through DVC, on the pipeline's own prepared data and model folder: its leave-one-out
table and its linear datamodeling score, each checked against the network retrained here by a plain
torch.optim.SGD loop and the score recomputed with scipy from the stage's own per-subset rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr

from sui_core.data.splits import read_split
from sui_core.linearized.reference import sgd_trained
from sui_core.network.models import load_model
from sui_core.network.outputs import targets
from tests.pipeline_project import SMALL, make_project, run, stages_ran

pytestmark = pytest.mark.slow
STEPS = 30


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    params = {
        **SMALL,
        "training": {**SMALL["training"], "t": STEPS},
        "validate": {
            "enabled": True,
            "samples": 4,
            "dtype": "float64",
            "influence": [],
            "checkpoint_fraction": None,
            "trained_directions": 0,
            "lds_subsets": 6,
        },
    }
    project = make_project(tmp_path_factory.mktemp("sui-validate"), params)
    return project, run(["dvc", "repro", "validate"], project)


def test_lds_rows_are_the_real_network_retrained_on_each_subset(validated):
    project, log = validated
    assert "validate" in stages_ran(log)
    assert "validate: LDS over 6 subsets" in log
    model, _ = load_model(project / "data/model")
    model = model.double()
    train, val = (read_split(project / f"data/prepared/{s}.parquet") for s in ("train", "val"))
    rows = pq.read_table(project / "data/validate/lds.parquet").to_pydict()
    members = pq.read_table(project / "data/validate/lds_subsets.parquet").to_pydict()
    subset_of = np.asarray(members["subset"])
    x, y = torch.as_tensor(train.x).double(), torch.as_tensor(targets(train.label, train.num_classes)).double()
    for subset in (0, 5):
        kept = np.isin(train.sample_id, np.asarray(members["sample_id"])[subset_of == subset])
        assert kept.sum() == round(0.5 * len(train))
        net = sgd_trained(model, x, y, SMALL["training"]["lr"], STEPS, keep=torch.as_tensor(kept))
        with torch.no_grad():
            expected = net(torch.as_tensor(val.x).double())[:, 0].numpy()
        mine = np.asarray(rows["subset"]) == subset
        assert np.asarray(rows["target_id"])[mine].tolist() == val.sample_id.tolist()
        np.testing.assert_allclose(np.asarray(rows["real"])[mine], expected, rtol=1e-8, atol=1e-10)


def test_lds_metrics_are_the_mean_spearman_of_the_rows(validated):
    project, _ = validated
    metrics = json.loads((project / "data/metrics/validate.json").read_text())
    rows = pq.read_table(project / "data/validate/lds.parquet").to_pandas()
    for name in ("group", "additive"):
        table = rows.pivot(index="subset", columns="target_id")
        values = [spearmanr(table["real"][t], table[name][t])[0] for t in table["real"].columns]
        assert metrics[f"lds_{name}"] == pytest.approx(np.nanmean(values), abs=1e-12)
    assert metrics["lds_subsets"] == 6 and 0 < metrics["lds_targets"] <= rows["target_id"].nunique()
    assert metrics["lds_group"] > 0.5, metrics  # lr·t = 1.5: the linearization follows the real run
    assert (project / "data/validate/plots/lds_per_target.png").is_file()
