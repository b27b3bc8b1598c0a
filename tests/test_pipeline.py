"""The DVC pipeline end to end on a small real data set: what reruns when a param changes, what MLflow
records, and that two runs with the same params give the same scores."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ALL_STAGES = ["prepare", "pretrain", "model", "jacobians", "ntk", "loo", "score", "evaluate", "validate"]
SMALL = {
    "data": {"source": "sklearn_digits", "classes": [3, 8], "max_train": 120, "label_noise": 0.1},
    "model": {"hidden": [64]},
    "jacobian": {"dims_per_tensor": 150, "batch_size": 32},
    "training": {"lr": 0.05, "t": 300},
}

pytestmark = pytest.mark.slow


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f.split("/")[0] in
            {"dvc.yaml", "params.yaml", "stages", "sui_core", ".dvc", ".dvcignore", "data", ".gitignore"}]


def env_for(project: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env["PYTHONPATH"] = str(project)
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env[key] = "sui-test"
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env[key] = "sui-test@localhost"
    return env


def run(cmd: list[str], project: Path) -> str:
    proc = subprocess.run(cmd, cwd=project, env=env_for(project), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def stages_ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def set_params(project: Path, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC copy of the project with small params, after one full `dvc repro`."""
    project = tmp_path_factory.mktemp("sui-project")
    for rel in tracked_files():
        dest = project / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "test project"], project)
    project.joinpath("first_repro.log").write_text(run(["dvc", "repro"], project))
    return project


def test_first_repro_runs_every_stage_and_writes_scores(project):
    assert stages_ran((project / "first_repro.log").read_text()) == ALL_STAGES
    scores = pq.read_table(project / "data/scores/scores.parquet").to_pydict()
    assert len(scores["fsi"]) == 120
    assert all(v >= 0 for v in scores["fsi"])
    assert sorted(scores["rank_fsi"]) == list(range(1, 121))
    metrics = yaml.safe_load((project / "data/metrics/evaluate.json").read_text())
    assert metrics["n_noisy"] == 12 and 0.5 < metrics["fsi_auroc"] <= 1
    groups = pq.read_table(project / "data/scores/groups.parquet").to_pydict()
    assert groups["group"] == ["3", "8"] and sum(groups["size"]) == 120
    assert all(g > 0 for g in groups["fsi_group"]) and all(m > 0 for m in groups["fsi_members_sum"])


def test_every_artifact_records_what_produced_it(project):
    commit = run(["git", "rev-parse", "HEAD"], project).strip()
    for meta_file, section in [("prepared/meta.json", "data"), ("ntk/meta.json", None),
                               ("loo/meta.json", "training"), ("scores/meta.json", "score"),
                               ("model/model.json", "model")]:
        meta = yaml.safe_load((project / "data" / meta_file).read_text())
        assert meta["code"]["git_commit"] == commit, meta_file
        if section:
            assert section in meta["params"], meta_file
    prepared = yaml.safe_load((project / "data/prepared/meta.json").read_text())
    assert prepared["params"]["data"]["seed"] == 0 and prepared["params"]["data"]["max_train"] == 120
    manifest = yaml.safe_load((project / "data/jacobians/manifest.json").read_text())
    assert manifest["projection"]["kind"] == "coordinates" and manifest["projection"]["seed"] == 0
    assert manifest["extra"]["code"]["git_commit"] == commit
    assert manifest["extra"]["params"]["jacobian"]["dims_per_tensor"] == 150


def test_noop_repro_reruns_nothing(project):
    assert stages_ran(run(["dvc", "repro"], project)) == []


def test_changing_training_t_reruns_only_loo_score_evaluate(project):
    set_params(project, training__t=150)  # validate (off: a constant record) reads the training section too
    assert stages_ran(run(["dvc", "repro"], project)) == ["loo", "score", "evaluate", "validate"]


def test_changing_jacobian_params_reruns_from_jacobians(project):
    set_params(project, jacobian__dims_per_tensor=120)
    assert stages_ran(run(["dvc", "repro"], project)) == ["jacobians", "ntk", "loo", "score", "evaluate", "validate"]


def test_mlflow_has_one_parent_per_repro_with_a_child_per_stage_that_ran(project):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sui")
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    stage_lists = [sorted(r.data.tags["sui.stage"] for r in children[p.info.run_id]) for p in parents]
    # the full run, then t changed, then the projection changed (the no-op repro adds nothing)
    assert stage_lists[:3] == [sorted(ALL_STAGES), sorted(["loo", "score", "evaluate", "validate"]),
                               sorted(["jacobians", "ntk", "loo", "score", "evaluate", "validate"])]
    first = parents[0]
    assert first.data.tags.get("sui.git_commit")
    assert first.data.params["training.t"] == "300"
    loo_child = next(r for r in children[first.info.run_id] if r.data.tags["sui.stage"] == "loo")
    assert "train_mse" in loo_child.data.metrics and loo_child.data.params["training.lr"] == "0.05"
    eval_child = next(r for r in children[first.info.run_id] if r.data.tags["sui.stage"] == "evaluate")
    assert "fsi_auroc" in eval_child.data.metrics
    artifacts = [a.path for a in client.list_artifacts(eval_child.info.run_id, "plots")]
    assert artifacts == ["plots/detection.png", "plots/fsi_clean_vs_noisy.png", "plots/group_fsi.png",
                         "plots/sui_best_clean_vs_noisy.png"]


def test_dvc_exp_run_is_a_named_parent_run(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "after repros"], project)
    out = run(["dvc", "exp", "run", "-S", "training.t=200", "-n", "short-training"], project)
    assert stages_ran(out) == ["loo", "score", "evaluate", "validate"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sui")
    named = client.search_runs([experiment.experiment_id], "tags.`sui.dvc_exp_name` = 'short-training'")
    parents = [r for r in named if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["training.t"] == "200"
    assert sorted(r.data.tags["sui.stage"] for r in named if r not in parents) == ["evaluate", "loo", "score", "validate"]


def test_same_params_give_identical_scores(project, tmp_path):
    before = (project / "data/scores/scores.parquet").read_bytes()
    run(["dvc", "repro", "--force", "prepare"], project)  # rebuild everything from the raw data
    run(["dvc", "repro"], project)
    table_before = pq.read_table(__import__("io").BytesIO(before))
    table_after = pq.read_table(project / "data/scores/scores.parquet")
    assert table_before.equals(table_after)


def test_sui_top_lists_the_extremes_of_the_scores(project):
    out = run([str(Path(sys.executable).parent / "sui"), "top", "--n", "3"], project)
    scores = pq.read_table(project / "data/scores/scores.parquet").to_pydict()
    order = sorted(range(len(scores["fsi"])), key=lambda i: -scores["fsi"][i])
    most, least = out.split("least informative")
    for i in order[:3]:
        assert f" {scores['sample_id'][i]} " in most
    for i in order[-3:]:
        assert f" {scores['sample_id'][i]} " in least


def test_dvc_plots_page_renders_offline(project, tmp_path):
    """All plots are PNG images, so `dvc plots show` needs no vega scripts from a CDN."""
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], project)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=[\"']?https?:", page)
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(images) == 4 and all((tmp_path / "plots" / src).is_file() for src in images)
