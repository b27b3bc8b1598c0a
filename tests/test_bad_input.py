"""Bad input gets one clear line naming the param or file, exit code 1, and no artifact a later
stage could trust."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

SMALL = {
    "data": {"source": "sklearn_digits", "classes": [0, 1], "max_train": 40, "label_noise": 0.1},
    "model": {"hidden": [16]},
    "jacobian": {"dims_per_tensor": 30},
    "training": {"lr": 0.05, "t": 50},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    write_params(SMALL)
    return tmp_path


def write_params(sections: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(sections))


def run_stage(name: str):
    app = importlib.import_module(f"stages.{name}").app
    return CliRunner().invoke(app, [])


def assert_fails(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_left(folder: str) -> None:
    """Neither the output folder nor a temporary sibling of it may remain."""
    assert not Path(folder).exists()
    parent = Path(folder).parent
    if parent.exists():
        assert not [p for p in parent.iterdir() if p.name.startswith(f".{Path(folder).name}.")]


def with_data(**changes) -> dict:
    params = {section: dict(values) for section, values in SMALL.items()}
    params["data"].update(changes)
    return params


def test_unknown_dataset(project):
    write_params(with_data(source="imagenet"))
    assert_fails(run_stage("prepare"), "data.source", "imagenet")
    assert_nothing_left("data/prepared")


def test_missing_npz(project):
    write_params(with_data(source="npz", npz_path="nowhere/digits.npz"))
    assert_fails(run_stage("prepare"), "nowhere/digits.npz")
    assert_nothing_left("data/prepared")


def test_npz_without_needed_arrays(project):
    np.savez("partial.npz", X_train=np.zeros((4, 3)), y_train=np.array([0, 1, 0, 1]))
    write_params(with_data(source="npz", npz_path="partial.npz", classes=None))
    assert_fails(run_stage("prepare"), "partial.npz", "X_val")
    assert_nothing_left("data/prepared")


def test_labels_out_of_range(project):
    rng = np.random.default_rng(0)
    np.savez("labels.npz", X_train=rng.normal(size=(6, 3)), y_train=np.array([0, 1, 0, 1, 2, 1]),
             X_val=rng.normal(size=(2, 3)), y_val=np.array([0, 1]))
    write_params(with_data(source="npz", npz_path="labels.npz", classes=[0, 1]))
    assert_fails(run_stage("prepare"), "y_train", "2")
    assert_nothing_left("data/prepared")


def test_nan_in_data(project):
    x = np.ones((6, 3))
    x[2, 1] = np.nan
    np.savez("nan.npz", X_train=x, y_train=np.array([0, 1, 0, 1, 0, 1]), X_val=np.ones((2, 3)), y_val=np.array([0, 1]))
    write_params(with_data(source="npz", npz_path="nan.npz", classes=None))
    assert_fails(run_stage("prepare"), "NaN", "X_train")
    assert_nothing_left("data/prepared")


@pytest.mark.parametrize("key,value,stage", [
    ("t", -5, "loo"), ("lr", -0.1, "loo"), ("lr", 0, "loo"), ("weight_decay", -0.01, "loo"), ("t", "soon", "loo"),
])
def test_bad_training_params(project, key, value, stage):
    params = {section: dict(values) for section, values in SMALL.items()}
    params["training"][key] = value
    write_params(params)
    assert_fails(run_stage(stage), f"training.{key}")
    assert_nothing_left("data/loo")


@pytest.mark.parametrize("value", [0, -3])
def test_projection_dims_not_positive(project, value):
    params = {section: dict(values) for section, values in SMALL.items()}
    params["jacobian"]["dims_per_tensor"] = value
    write_params(params)
    assert_fails(run_stage("jacobians"), "jacobian.dims_per_tensor")
    assert_nothing_left("data/jacobians")


def test_unknown_param_key(project):
    params = {section: dict(values) for section, values in SMALL.items()}
    params["training"]["learning_rate"] = 0.1
    write_params(params)
    assert_fails(run_stage("loo"), "training.learning_rate", "unknown key")


def test_missing_upstream_artifact(project):
    assert_fails(run_stage("model"), "data/prepared/train.parquet")
    assert_nothing_left("data/model")


def test_jacobian_shard_that_does_not_match_its_manifest(project):
    for stage in ("prepare", "model", "jacobians"):
        assert run_stage(stage).exit_code == 0
    shard = Path("data/jacobians/train-00000.parquet")
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, e.g. by a full disk
    assert_fails(run_stage("ntk"), "train-00000.parquet")
    assert_nothing_left("data/ntk")


def test_divergent_learning_rate_is_refused(project):
    for stage in ("prepare", "model", "jacobians", "ntk"):
        assert run_stage(stage).exit_code == 0
    params = {section: dict(values) for section, values in SMALL.items()}
    params["training"]["lr"] = 1000.0
    write_params(params)
    assert_fails(run_stage("loo"), "training.lr", "diverges")
    assert_nothing_left("data/loo")
