"""The DVC pipeline end to end on a small real data set: what reruns when a param changes, what MLflow
records, and that two runs with the same params give the same scores."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pipeline_project import ALL_STAGES, env_for, make_project, run, stages_ran

pytestmark = pytest.mark.slow


def set_params(project: Path, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC copy of the project with small params, after one full `dvc repro`."""
    project = make_project(tmp_path_factory.mktemp("sui-project"))
    project.joinpath("first_repro.log").write_text(run(["dvc", "repro"], project))
    return project


def test_first_repro_runs_every_stage_and_writes_scores(project):
    assert stages_ran((project / "first_repro.log").read_text()) == [*ALL_STAGES, "track"]
    scores = pq.read_table(project / "data/scores/scores.parquet").to_pydict()
    assert len(scores["fsi"]) == 120
    assert all(v >= 0 for v in scores["fsi"])
    assert sorted(scores["rank_fsi"]) == list(range(1, 121))
    metrics = yaml.safe_load((project / "data/metrics/evaluate.json").read_text())
    assert metrics["n_noisy"] == 12 and 0.5 < metrics["fsi_auroc"] <= 1
    groups = pq.read_table(project / "data/scores/groups.parquet").to_pydict()
    assert groups["group"] == ["3", "8"] and sum(groups["size"]) == 120
    assert all(g > 0 for g in groups["fsi_group"]) and all(m > 0 for m in groups["fsi_members_sum"])


def test_suspects_flags_labels_as_estimated_without_seeing_the_flips(project):
    """The 12 flips data.label_noise injected are the 'unknown' errors: the stage chose its detector and
    threshold on its own flipped copies; measured against the 12, precision and recall are near its
    estimates (measured: estimated precision 0.86, recall 0.83; both 0.83 against the 12)."""
    table = pq.read_table(project / "data/suspects/suspects.parquet").to_pydict()
    assert table["rank"] == list(range(1, 121)) and table["suspicion"] == sorted(table["suspicion"], reverse=True)
    calibration = json.loads((project / "data/suspects/meta.json").read_text())["calibration"]
    prepared = pq.read_table(project / "data/prepared/train.parquet", columns=["sample_id", "noisy"]).to_pydict()
    noisy = dict(zip(prepared["sample_id"], prepared["noisy"]))
    flagged = [noisy[i] for i, f in zip(table["sample_id"], table["flagged"]) if f]
    assert len(flagged) == calibration["flagged"] > 0
    assert abs(sum(flagged) / len(flagged) - calibration["estimated_precision"]) < 0.15
    assert abs(sum(flagged) / 12 - calibration["estimated_recall"]) < 0.2
    given_vs_predicted = [(g, p) for g, p, f in zip(table["label"], table["predicted"], table["flagged"]) if f]
    assert all(g in ("3", "8") and p in ("3", "8") for g, p in given_vs_predicted)
    assert (project / "data/suspects/plots/suspects_gallery.png").stat().st_size > 10_000
    printed = run(["sui", "suspects", "--n", "5"], project).splitlines()
    assert printed[0].startswith(f"{calibration['flagged']} of the labels flagged") and len(printed) == 7
    assert printed[2].split()[:2] == ["1", str(table["sample_id"][0])]


def test_every_artifact_records_what_produced_it(project):
    """Each output's meta.json: the params it depends on, however far upstream, and a sha256 per file; the
    code version lies outside the outputs (.sui/provenance), so it cannot change their hashes."""
    commit = run(["git", "rev-parse", "HEAD"], project).strip()
    for stage, folder, upstream in [
        ("prepare", "prepared", {"data.seed": 0, "data.max_train": 120}),
        ("model", "model", {"data.seed": 0, "model.hidden": [64]}),
        ("jacobians", "jacobians", {"model.hidden": [64], "jacobian.dims_per_tensor": 150}),
        ("ntk", "ntk", {"jacobian.dims_per_tensor": 150, "data.max_train": 120}),
        ("loo", "loo", {"training.t": 300, "jacobian.seed": 0, "data.seed": 0}),
        ("score", "scores", {"score.sigma": 1.0, "training.lr": 0.05, "training.t": 300}),
        ("evaluate", "evaluate", {"detection.folds": 5, "model.init_seed": 0}),
    ]:
        meta = json.loads((project / "data" / folder / "meta.json").read_text())
        assert meta["stage"] == stage and "code" not in meta
        assert {key: meta["lineage"].get(key) for key in upstream} == upstream, folder
        for name, sha in meta["files"].items():
            assert hashlib.sha256((project / "data" / folder / name).read_bytes()).hexdigest() == sha
        provenance = json.loads((project / ".sui" / "provenance" / f"{stage}.json").read_text())
        assert provenance["code"]["git_commit"] == commit
        meta_sha = hashlib.sha256((project / "data" / folder / "meta.json").read_bytes()).hexdigest()
        assert provenance["outputs"][f"data/{folder}"] == meta_sha
    assert "code" not in (project / "data/model/model.json").read_text()
    manifest = json.loads((project / "data/jacobians/manifest.json").read_text())
    assert manifest["projection"]["kind"] == "coordinates" and manifest["projection"]["seed"] == 0


def _stage_by_hand(project: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=project,
        env=env_for(project),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_stage_run_by_hand_refuses_inputs_of_other_params(project):
    """The score stage after training.lr changed, without rerunning loo: one line naming both values."""
    scores = (project / "data/scores/scores.parquet").read_bytes()
    params = (project / "params.yaml").read_text()
    set_params(project, training__lr=0.1)
    try:
        proc = _stage_by_hand(project, "score")
    finally:
        (project / "params.yaml").write_text(params)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data/loo: computed with training.lr = 0.05, but this stage runs with training.lr = 0.1; rerun the "
        "stages before it (dvc repro), do not mix outputs of different params"
    )
    assert (project / "data/scores/scores.parquet").read_bytes() == scores


@pytest.mark.parametrize("offset", [4, 1000, -100])
def test_a_corrupted_input_is_refused(project, offset):
    forms = project / "data/loo/forms.parquet"
    original = forms.read_bytes()
    flipped = bytearray(original)
    flipped[offset] ^= 0x10
    forms.write_bytes(bytes(flipped))
    try:
        proc = _stage_by_hand(project, "score")
    finally:
        forms.write_bytes(original)
    assert proc.returncode == 1, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: data/loo/forms.parquet: sha256 does not match data/loo/meta.json")
    )


def test_noop_repro_reruns_nothing(project):
    assert stages_ran(run(["dvc", "repro"], project)) == ["track"]  # always_changed (stages/track.py)


def test_changing_training_t_reruns_only_loo_score_evaluate(project):
    set_params(project, training__t=150)  # validate (off: a constant record) reads the training section too
    assert stages_ran(run(["dvc", "repro"], project)) == [*ALL_STAGES[ALL_STAGES.index("loo") :], "track"]


def test_changing_jacobian_params_reruns_from_jacobians(project):
    set_params(project, jacobian__dims_per_tensor=120)
    assert stages_ran(run(["dvc", "repro"], project)) == [*ALL_STAGES[ALL_STAGES.index("jacobians") :], "track"]


def test_mlflow_has_one_parent_per_repro_with_a_child_per_stage_that_ran(project):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sui")
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags["sui.kind"] == "dvc-repro"]
    children = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents
    }
    stage_lists = [sorted(r.data.tags["sui.stage"] for r in children[p.info.run_id]) for p in parents]
    # the full run, then t changed, then the projection changed (the no-op repro adds nothing)
    assert stage_lists[:3] == [
        sorted(ALL_STAGES),
        sorted(ALL_STAGES[ALL_STAGES.index("loo") :]),
        sorted(ALL_STAGES[ALL_STAGES.index("jacobians") :]),
    ]
    first = parents[0]
    assert first.data.tags.get("sui.git_commit")
    assert first.data.params["training.t"] == "300"
    loo_child = next(r for r in children[first.info.run_id] if r.data.tags["sui.stage"] == "loo")
    assert "train_mse" in loo_child.data.metrics and loo_child.data.params["training.lr"] == "0.05"
    eval_child = next(r for r in children[first.info.run_id] if r.data.tags["sui.stage"] == "evaluate")
    assert "fsi_auroc" in eval_child.data.metrics
    artifacts = [a.path for a in client.list_artifacts(eval_child.info.run_id, "plots")]
    assert artifacts == [
        "plots/detection.png",
        "plots/fsi_clean_vs_noisy.png",
        "plots/group_fsi.png",
        "plots/sui_best_clean_vs_noisy.png",
    ]


def test_dvc_exp_run_is_a_named_parent_run(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "after repros"], project)
    out = run(["dvc", "exp", "run", "-S", "training.t=200", "-n", "short-training"], project)
    assert stages_ran(out) == [*ALL_STAGES[ALL_STAGES.index("loo") :], "track"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sui")
    named = client.search_runs([experiment.experiment_id], "tags.`sui.dvc_exp_name` = 'short-training'")
    parents = [r for r in named if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["training.t"] == "200"
    assert sorted(r.data.tags["sui.stage"] for r in named if r not in parents) == sorted(
        ALL_STAGES[ALL_STAGES.index("loo") :]
    )


def test_same_params_give_identical_outputs_across_commits(project, tmp_path):
    """Rebuilt from the raw data at another commit: every output hash in dvc.lock is the same."""

    def outs() -> dict:
        lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        return {stage: [(o["path"], o["md5"]) for o in entry.get("outs", [])] for stage, entry in lock.items()}

    before = outs()
    run(["git", "commit", "-q", "--allow-empty", "-m", "another commit"], project)
    run(["dvc", "repro", "--force"], project)  # every stage again, from the raw data
    assert outs() == before


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
    assert len(images) == 5 and all((tmp_path / "plots" / src).is_file() for src in images)
