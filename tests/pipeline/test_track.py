"""Parent runs hold results: stage metrics rolled up to the parent (prefixed by stage), and the `track`
stage, which logs the metrics of stages DVC did not run (restored from its run cache, or unchanged)."""

import json
import math
import re
import subprocess
import sys

import pytest
from pipeline_project import ALL_STAGES, ROOT, env_for, make_project, run, stages_ran

from stages import track, tracking


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("SUI_TRACKING", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUI_SESSION_KEY", "session-under-test")
    return uri


def _parents(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    return [r for r in runs if tracking.PARENT_TAG not in r.data.tags]


def test_stage_metrics_roll_up_to_the_parent_prefixed_by_stage(mlflow_uri):
    with tracking.stage_run("prepare", {}) as run_:
        run_.log_metrics({"n_train": 10, "split": {"val": 4}})
    with tracking.stage_run("evaluate", {}) as run_:
        run_.log_metrics({"fsi_auroc": 0.75})
    [parent] = _parents(mlflow_uri)
    assert parent.data.metrics == {"prepare.n_train": 10.0, "prepare.split.val": 4.0, "evaluate.fsi_auroc": 0.75}


def test_track_logs_the_stages_without_a_child_run_on_the_parent(mlflow_uri):
    with tracking.stage_run("loo", {}) as run_:
        run_.log_metrics({"train_mse": 0.5})
    outputs = {"prepare": {"n_train": 120}, "loo": {"train_mse": 99.0}, "evaluate": {"fsi_auroc": 0.9, "sub": {"x": 1}}}
    assert tracking.log_restored(["prepare", "loo", "evaluate"], outputs.get) == ["prepare", "evaluate"]
    [parent] = _parents(mlflow_uri)
    assert parent.data.metrics == {
        "loo.train_mse": 0.5,
        "prepare.n_train": 120.0,
        "evaluate.fsi_auroc": 0.9,
        "evaluate.sub.x": 1.0,
    }  # loo's own value, not the one read from outputs
    assert parent.data.tags[tracking.RESTORED_TAG] == "prepare,evaluate"


def test_track_makes_a_parent_for_an_experiment_only(mlflow_uri, monkeypatch):
    assert tracking.log_restored(["evaluate"], {"evaluate": {"fsi_auroc": 0.9}}.get) is None  # plain repro
    assert _parents(mlflow_uri) == []
    monkeypatch.setenv("DVC_EXP_NAME", "cached-exp")
    params = {"training": {"t": 200}}
    assert tracking.log_restored(["evaluate"], {"evaluate": {"fsi_auroc": 0.9}}.get, params) == ["evaluate"]
    [parent] = _parents(mlflow_uri)
    assert parent.info.run_name == "cached-exp" and parent.info.status == "FINISHED"
    assert parent.data.params == {"training.t": "200"} and parent.data.metrics == {"evaluate.fsi_auroc": 0.9}
    assert parent.data.tags[tracking.RESTORED_TAG] == "evaluate"


def test_track_reads_the_numbers_of_a_stages_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/metrics").mkdir(parents=True)
    (tmp_path / "data/prepared").mkdir()
    (tmp_path / "data/metrics/evaluate.json").write_text(
        json.dumps({"fsi_auroc": 0.8, "n_noisy": 12, "enabled": True, "note": "text", "nan": float("nan")})
    )
    (tmp_path / "data/prepared/meta.json").write_text(
        json.dumps({"summary": {"n_train": 120, "per_class": {"3": 61}}, "seed": 5})
    )
    assert track.stage_metrics("evaluate") == {"fsi_auroc": 0.8, "n_noisy": 12}
    assert track.stage_metrics("prepare") == {"n_train": 120}
    assert track.stage_metrics("score") == {}


def test_track_stage_does_nothing_with_tracking_off(tmp_path):
    """Not even reading params.yaml or the outputs: none exist here."""
    env = {**env_for(tmp_path), "SUI_TRACKING": "off", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.track"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_an_experiment_restored_from_the_run_cache_is_a_parent_with_its_metrics(tmp_path):
    project = make_project(tmp_path / "project")
    first = run(["dvc", "exp", "run", "-S", "training.t=200"], project)
    assert stages_ran(first) == [*ALL_STAGES, "track"]
    evaluate = json.loads((project / "data/metrics/evaluate.json").read_text())
    # --temp: a fresh copy of the commit, so every stage is restored from the run cache
    again = run(["dvc", "exp", "run", "--temp", "-S", "training.t=200"], project)
    assert stages_ran(again) == ["track"]  # always_changed: never restored itself
    assert sorted(re.findall(r"Stage '([a-z]+)' is cached - skipping run", again)) == sorted(ALL_STAGES)
    assert stages_ran(run(["dvc", "repro"], project)) == ["track"]  # nothing ran: no parent for it

    computed, restored = _parents(env_for(project)["MLFLOW_TRACKING_URI"])  # exactly two parents
    assert tracking.RESTORED_TAG not in computed.data.tags
    assert restored.data.tags[tracking.RESTORED_TAG] == ",".join(ALL_STAGES)
    assert restored.data.tags["sui.dvc_exp_name"] and restored.data.params["training.t"] == "200"
    expected = {
        f"evaluate.{k}": float(v)
        for k, v in evaluate.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    for parent in (computed, restored):
        assert {k: v for k, v in parent.data.metrics.items() if k.startswith("evaluate.")} == pytest.approx(expected)
