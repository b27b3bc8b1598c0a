"""Detection metrics against direct definitions, and the per-source report of the evaluate stage."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sui_core.studies.evaluation import detection_metrics


def test_detection_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    flagged = rng.random(200) < 0.15
    score = rng.normal(size=200) + 1.5 * flagged
    got = detection_metrics(score, flagged, [0.05, 0.1, 0.2])
    pos, neg = score[flagged], score[~flagged]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert got["auroc"] == pytest.approx(pairs)
    order = np.argsort(-score)
    hits = flagged[order]
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    assert got["ap"] == pytest.approx(precision_at_hits.mean())
    for f in (0.05, 0.1, 0.2):
        top = order[: round(f * 200)]
        assert got[f"found_at_{round(f * 100)}pct"] == pytest.approx(flagged[top].sum() / flagged.sum())
    assert detection_metrics(score, np.zeros(200, bool), [0.1]) == {}


@pytest.mark.slow
def test_two_real_sources_reported_per_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    params = {
        "data": {"source": "mixed_digits", "classes": [3, 8], "max_train": 160},
        "model": {"hidden": [128]},
        "jacobian": {"dims_per_tensor": 300},
        "training": {"lr": 0.05, "t": 300},
        "loo": {"groups": ["label", "source"]},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for name in ("prepare", "model", "jacobians", "ntk", "loo", "score", "evaluate"):
        result = CliRunner().invoke(importlib.import_module(f"stages.{name}").app, [])
        assert result.exit_code == 0, f"stage {name} failed:\n{result.output}\n{result.exception!r}"
    import pyarrow.parquet as pq

    scores = pq.read_table("data/scores/scores.parquet").to_pydict()
    fsi, source = np.asarray(scores["fsi"]), np.asarray(scores["source"])
    metrics = json.loads(Path("data/metrics/evaluate.json").read_text())
    for name in ("mnist", "sklearn_digits"):
        assert metrics[f"fsi_mean_source_{name}"] == pytest.approx(fsi[source == name].mean())
    assert Path("data/evaluate/plots/fsi_by_source.png").stat().st_size > 0
    groups = pq.read_table("data/scores/groups.parquet").to_pydict()
    assert sorted(zip(groups["column"], groups["group"])) == [
        ("label", "3"),
        ("label", "8"),
        ("source", "mnist"),
        ("source", "sklearn_digits"),
    ]
