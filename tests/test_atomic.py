"""Atomic outputs: a corrupted .npz is one clear error, and temporary folders of killed writers are
cleaned on the next write while those of live writers are left alone."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sui_core.errors import ArtifactError
from sui_core.io import UNLOCKED_GRACE_S, atomic_dir
from sui_core.linearized.ntk import Basis

ROOT = Path(__file__).resolve().parents[1]


def saved_basis(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Basis("kernel", np.array([3.0, 2.0, 1.0]), rng.normal(size=(200, 2, 3)), np.eye(3), 7, 11).save(path)
    return path


def corrupted(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    elif how == "first byte":
        data[0] ^= 0xFF
    else:  # a few bytes in the middle: inside z, by far the largest array
        for offset in range(len(data) // 2, len(data) // 2 + 40, 10):
            data[offset] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "first byte", "flipped bytes"])
def test_corrupted_basis_is_one_artifact_error(tmp_path, how):
    path = saved_basis(tmp_path / "basis.npz")
    Basis.load(path)  # intact, it loads
    corrupted(path, how)
    with pytest.raises(ArtifactError) as info:
        Basis.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "rerun the stage" in message


def test_loo_stage_on_a_corrupted_basis_prints_one_line(tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    Path("params.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"source": "sklearn_digits", "classes": [0, 1], "max_train": 30},
                "model": {"hidden": [8]},
                "jacobian": {"dims_per_tensor": 20},
                "training": {"lr": 0.05, "t": 20},
            }
        )
    )

    def run(stage: str):
        return CliRunner().invoke(importlib.import_module(f"stages.{stage}").app, [])

    for stage in ("prepare", "model", "jacobians", "ntk"):
        assert run(stage).exit_code == 0
    corrupted(Path("data/ntk/basis.npz"), "flipped bytes")
    result = run("loo")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data/ntk/basis.npz: "), result.stderr


# ---- stale temporary folders ---------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from sui_core.io import atomic_dir

out, name = sys.argv[1], sys.argv[2]
with atomic_dir(out) as tmp:
    (tmp / "who").write_text(name)
    Path(name + ".ready").write_text(str(tmp))
    while not Path(name + ".go").exists():
        time.sleep(0.02)
"""


def start_writer(name: str) -> tuple[subprocess.Popen, Path]:
    """A process inside atomic_dir("data/out"), waiting for `<name>.go`; returns it and its temp folder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, "data/out", name], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not Path(f"{name}.ready").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the writer never entered atomic_dir"
        time.sleep(0.02)
    return proc, Path(Path(f"{name}.ready").read_text())


def test_killed_writers_folder_is_removed_and_a_live_writers_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    killed, killed_tmp = start_writer("killed")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed_tmp.is_dir()  # what a SIGKILL leaves behind
    live, live_tmp = start_writer("live")
    try:
        with atomic_dir("data/out") as tmp:
            assert not killed_tmp.exists()  # gone before this writer starts
            assert (live_tmp / "who").read_text() == "live"  # untouched
            (tmp / "who").write_text("me")
        assert sorted(p.name for p in Path("data/out").iterdir()) == ["who"]  # no lock file published
        assert (Path("data/out") / "who").read_text() == "me"
        Path("live.go").touch()
        assert live.wait(timeout=60) == 0, live.stderr.read().decode()
    finally:
        live.kill()
        live.wait()
    assert (Path("data/out") / "who").read_text() == "live"  # the live writer published fine afterwards
    assert sorted(p.name for p in Path("data").iterdir()) == ["out"]  # no temp folder or lock file left


def test_unlocked_folders_are_removed_only_when_old(tmp_path, monkeypatch):
    """Folders without a lock file (from code before the lock, or a writer killed before it locked)."""
    monkeypatch.chdir(tmp_path)
    data = Path("data")
    old, young = data / ".out.aaaaaaaa.tmp", data / ".out.bbbbbbbb.tmp"
    other = data / ".out.json.cccccccc.tmp"  # another output's temporary file
    for folder in (old, young):
        folder.mkdir(parents=True)
        (folder / "part").write_text("x")
    other.write_text("x")
    long_ago = time.time() - 2 * UNLOCKED_GRACE_S
    for path in (old, other):
        os.utime(path, (long_ago, long_ago))
    with atomic_dir(data / "out") as tmp:
        (tmp / "who").write_text("me")
    assert not old.exists()
    assert young.is_dir() and other.is_file()
