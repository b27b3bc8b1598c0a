"""Bad input gets one clear line naming the param or file, exit code 1, and no artifact a later
stage could trust."""

import importlib
import re
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
    # progress bars (tqdm, on stderr) are not messages
    lines = [line for line in result.stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
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
    np.savez(
        "labels.npz",
        X_train=rng.normal(size=(6, 3)),
        y_train=np.array([0, 1, 0, 1, 2, 1]),
        X_val=rng.normal(size=(2, 3)),
        y_val=np.array([0, 1]),
    )
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


@pytest.mark.parametrize(
    "key,value,stage",
    [
        ("t", -5, "loo"),
        ("lr", -0.1, "loo"),
        ("lr", 0, "loo"),
        ("weight_decay", -0.01, "loo"),
        ("t", "soon", "loo"),
    ],
)
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
    assert_fails(run_stage("model"), "data/prepared/meta.json: file not found")
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


# ---- later stages must refuse what a failed stage left -------------------------------------------


def assert_downstream_refuses(stage: str, *needles: str) -> None:
    """The next stage finds no artifact to trust: it fails with one line naming the missing file."""
    assert_fails(run_stage(stage), *needles)


def npz(name: str, **arrays) -> str:
    rng = np.random.default_rng(0)
    defaults = {
        "X_train": rng.normal(size=(6, 3)),
        "y_train": np.array([0, 1, 0, 1, 0, 1]),
        "X_val": rng.normal(size=(2, 3)),
        "y_val": np.array([0, 1]),
    }
    np.savez(name, **{**defaults, **arrays})
    return name


# ---- params of the wrong type --------------------------------------------------------------------


@pytest.mark.parametrize(
    "section,key,value,stage,folder",
    [
        ("data", "max_train", "40", "prepare", "data/prepared"),  # string where int
        ("training", "lr", [0.05], "loo", "data/loo"),  # list where float
        ("jacobian", "batch_size", 6.5, "jacobians", "data/jacobians"),  # float where int
    ],
)
def test_param_of_wrong_type(project, section, key, value, stage, folder):
    params = {s: dict(v) for s, v in SMALL.items()}
    params.setdefault(section, {})[key] = value
    write_params(params)
    assert_fails(run_stage(stage), f"{section}.{key}", "must be")
    assert_nothing_left(folder)


# ---- classes -------------------------------------------------------------------------------------


def test_class_without_samples_in_npz(project):
    write_params(with_data(source="npz", npz_path=npz("empty.npz"), classes=[0, 1, 2]))
    assert_fails(run_stage("prepare"), "empty.npz", "no training samples of class [2]")
    assert_nothing_left("data/prepared")
    assert_downstream_refuses("model", "data/prepared/meta.json")


def test_class_absent_from_builtin_source(project):
    write_params(with_data(classes=[0, 1, 10]))
    assert_fails(run_stage("prepare"), "data.classes", "10")
    assert_nothing_left("data/prepared")


def test_one_class_only_in_npz(project):
    write_params(
        with_data(source="npz", classes=None, npz_path=npz("one.npz", y_train=np.zeros(6, int), y_val=np.zeros(2, int)))
    )
    assert_fails(run_stage("prepare"), "one.npz", "at least 2 classes")
    assert_nothing_left("data/prepared")
    assert_downstream_refuses("model", "data/prepared/meta.json")


def test_one_class_only_in_params(project):
    write_params(with_data(classes=[3]))
    assert_fails(run_stage("prepare"), "data.classes", "two distinct classes")
    assert_nothing_left("data/prepared")


# ---- pixels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_pixels(project, value):
    x = np.ones((6, 8, 8))
    x[3, 2, 5] = value
    write_params(with_data(source="npz", classes=None, npz_path=npz("inf.npz", X_train=x, X_val=np.ones((2, 8, 8)))))
    assert_fails(run_stage("prepare"), "inf.npz", "X_train", "NaN/Inf")
    assert_nothing_left("data/prepared")


def test_images_of_mixed_sizes(project):
    ragged = np.empty(6, dtype=object)
    for i in range(6):
        ragged[i] = np.ones((8, 8) if i % 2 else (7, 7))
    write_params(
        with_data(source="npz", classes=None, npz_path=npz("mixed.npz", X_train=ragged, X_val=np.ones((2, 8, 8))))
    )
    assert_fails(run_stage("prepare"), "mixed.npz")
    assert_nothing_left("data/prepared")
    assert_downstream_refuses("model", "data/prepared/meta.json")


# ---- corrupted or mismatched artifacts -----------------------------------------------------------


def test_corrupted_parquet_footer_of_prepared_split(project):
    assert run_stage("prepare").exit_code == 0
    split = Path("data/prepared/train.parquet")
    raw = split.read_bytes()
    split.write_bytes(raw[:-8] + b"\0" * 8)  # footer length and magic "PAR1" gone
    assert_fails(run_stage("model"), "data/prepared/train.parquet", "sha256 does not match")
    assert_nothing_left("data/model")
    assert_downstream_refuses("jacobians", "data/model")


def test_init_path_with_other_output_count(project):
    import torch
    from torch import nn

    assert run_stage("prepare").exit_code == 0  # two classes: the model has 1 output
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.save(three.state_dict(), "w3.pt")
    params = {s: dict(v) for s, v in SMALL.items()}
    params["model"]["init_path"] = "w3.pt"
    write_params(params)
    assert_fails(run_stage("model"), "model.init_path", "w3.pt", "[3, 16]", "[1, 16]")
    assert_nothing_left("data/model")
    assert_downstream_refuses("jacobians", "data/model")


# ---- the disk fills up, the process is killed ----------------------------------------------------


def _enospc_on_call(monkeypatch, number: int, errno_set: bool = True) -> None:
    """Make the `number`-th Parquet write (1-based) fail as a full disk does, after writing half a file."""
    import errno
    import os

    import sui_core.io as io

    real, calls = io.pq.write_table, []

    def write_table(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) == number:
            Path(where).write_bytes(b"PAR1" + b"\0" * 100)  # a partial file, as a full disk leaves it
            if errno_set:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")  # pyarrow's
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(io.pq, "write_table", write_table)


def test_disk_full_while_preparing(project, monkeypatch):
    _enospc_on_call(monkeypatch, 2)  # train.parquet written, val.parquet half written
    assert_fails(run_stage("prepare"), "data/prepared", "no space left")
    assert_nothing_left("data/prepared")
    assert_downstream_refuses("model", "data/prepared/meta.json")


def test_disk_full_while_writing_jacobian_shards(project, monkeypatch):
    for stage in ("prepare", "model"):
        assert run_stage(stage).exit_code == 0
    _enospc_on_call(monkeypatch, 1, errno_set=False)
    assert_fails(run_stage("jacobians"), "data/jacobians", "no space left")
    assert_nothing_left("data/jacobians")
    assert_downstream_refuses("ntk", "data/jacobians/meta.json")


KILLED_WRITER = """
import sys, time
from pathlib import Path
import sui_core.io as io

real = io.pq.write_table

def write_table(table, where, *args, **kwargs):
    real(table, where, *args, **kwargs)
    Path("writing").write_text(str(where))  # one file of the new folder is written: kill me now
    time.sleep(600)

io.pq.write_table = write_table
from stages.prepare import app
app(["--params", "params.yaml"])
"""


def test_stage_killed_mid_write_then_rerun(project):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from sui_core.data.splits import read_split

    assert run_stage("prepare").exit_code == 0  # an old complete output
    old_meta = json.loads(Path("data/prepared/meta.json").read_text())
    write_params(with_data(seed=1))
    Path("killed.py").write_text(KILLED_WRITER)
    env = {
        **os.environ,
        "SUI_TRACKING": "off",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "killed.py"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not Path("writing").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the stage never started writing"
            time.sleep(0.05)
        assert "data/.prepared." in Path("writing").read_text()  # mid-write, into the temporary folder
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # only the old complete output is visible, untouched; the killed run's temporary folder is not trusted
    assert json.loads(Path("data/prepared/meta.json").read_text()) == old_meta
    assert sorted(p.name for p in Path("data/prepared").iterdir()) == [
        "meta.json",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]
    for split in ("train", "val", "test"):
        read_split(f"data/prepared/{split}.parquet")
    assert run_stage("model").exit_code == 0  # a later stage consumes the old one
    # the rerun succeeds and replaces it
    result = run_stage("prepare")
    assert result.exit_code == 0, result.output
    assert json.loads(Path("data/prepared/meta.json").read_text())["params"]["data"]["seed"] == 1


def test_mistyped_section_names_the_closest_one(project):
    from sui_core.config import load_params

    write_params({**SMALL, "trainig": {"lr": 5}})  # training.lr meant: the defaults would be used silently
    assert_fails(run_stage("loo"), "params.yaml: trainig: unknown section", "did you mean `training`?")
    assert_nothing_left("data/loo")
    # while the project's own params.yaml and every one under examples/ use known sections only
    root = Path(__file__).resolve().parents[2]
    files = [root / "params.yaml", *sorted((root / "examples").rglob("*.yaml"))]
    assert len(files) >= 2
    for path in files:
        load_params(path)
