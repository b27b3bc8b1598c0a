"""The on-disk contract of stage outputs (sui_core.artifacts) and the stage runner's refusal to publish
an output whose params changed while the stage ran (stages.common)."""

import json
import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages import common
from sui_core import artifacts
from sui_core.errors import ArtifactError
from sui_core.io import atomic_dir


def _output(folder: Path, stage: str, params: dict, inputs=(), files=None) -> artifacts.Output:
    with atomic_dir(folder) as out:
        for name, data in (files or {"a.bin": os.urandom(3000), "sub/b.txt": b"hello\n" * 50}).items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        artifacts.publish(out, stage, params, inputs)
    return artifacts.open_output(folder)


def test_round_trip_records_hashes_params_and_lineage(tmp_path):
    prepared = _output(tmp_path / "prepared", "prepare", {"data": {"seed": 3, "classes": (4, 9)}})
    loo = _output(tmp_path / "loo", "loo", {"training": {"t": 500.0}}, [prepared])
    meta = json.loads((tmp_path / "loo" / "meta.json").read_text())
    assert sorted(meta["files"]) == ["a.bin", "sub/b.txt"]
    assert meta["lineage"] == {"data.classes": [4, 9], "data.seed": 3, "training.t": 500.0}
    assert loo.file("a.bin") == tmp_path / "loo" / "a.bin"
    with pytest.raises(ArtifactError, match="holds no file 'c.bin'"):
        loo.file("c.bin")
    # the reader's own view agrees (tuples and lists are the same param): no error
    artifacts.open_output(tmp_path / "loo", {"data": {"classes": [4, 9]}, "training": {"t": 500}})


@pytest.mark.parametrize("offset", [0, 1, 517, 1500, 2999, -2, -1])
def test_any_flipped_byte_is_refused_naming_the_file(tmp_path, offset):
    """Issue: 6 of 7 flipped offsets of forms.parquet gave silently different scores."""
    _output(tmp_path / "loo", "loo", {"training": {"t": 500}})
    target = tmp_path / "loo" / "a.bin"
    data = bytearray(target.read_bytes())
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"a\.bin: sha256 does not match .*meta\.json"):
        artifacts.open_output(tmp_path / "loo")


def test_missing_truncated_or_foreign_meta(tmp_path):
    _output(tmp_path / "loo", "loo", {"training": {"t": 500}})
    (tmp_path / "loo" / "sub" / "b.txt").unlink()
    with pytest.raises(ArtifactError, match=r"b\.txt: file listed in .* is missing"):
        artifacts.open_output(tmp_path / "loo")
    (tmp_path / "loo" / "meta.json").write_text('{"stage": "loo", "params"')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifacts.open_output(tmp_path / "loo")
    (tmp_path / "loo" / "meta.json").write_text('{"stage": "loo", "params": {}}')  # an old-format record
    with pytest.raises(ArtifactError, match="not a sui output record"):
        artifacts.open_output(tmp_path / "loo")
    with pytest.raises(ArtifactError, match=r"nothing/meta\.json: file not found \(run the ntk stage first"):
        artifacts.open_output(tmp_path / "nothing", stage="ntk")


def test_input_computed_with_other_params_is_refused_naming_key_and_values(tmp_path):
    """Issue: the score stage run by hand after training.lr changed silently doubled si_hessian."""
    prepared = _output(tmp_path / "prepared", "prepare", {"data": {"seed": 0}})
    _output(tmp_path / "loo", "loo", {"training": {"lr": 0.01, "t": 1000.0}}, [prepared])
    with pytest.raises(ArtifactError) as caught:
        artifacts.open_output(tmp_path / "loo", {"training": {"lr": 0.02}})
    assert "training.lr = 0.01" in str(caught.value) and "training.lr = 0.02" in str(caught.value)
    with pytest.raises(ArtifactError, match="data.seed = 0.*data.seed = 1"):  # carried from upstream
        artifacts.open_output(tmp_path / "loo", {"data.seed": 1})
    artifacts.open_output(tmp_path / "loo", {"score": {"sigma": 2.0}})  # keys it does not record: no opinion


def test_same_inputs_give_byte_identical_records(tmp_path):
    """No time, code version or path of the temporary folder in meta.json: same params, same bytes."""
    files = {"a.bin": b"x" * 100}
    for name in ("one", "two"):
        _output(tmp_path / name / "loo", "loo", {"training": {"t": 5}}, files=files)
    assert (tmp_path / "one/loo/meta.json").read_bytes() == (tmp_path / "two/loo/meta.json").read_bytes()


# ---- the stage runner: params that change while a stage runs ---------------------------------------

PARAMS = """\
    training: {lr: 0.01, t: 500}
    score: {sigma: 1.0}
    loo: {tol: 1.0e-14}
"""


def _stage(tmp_path: Path, monkeypatch, rewrite: str | None, when: str):
    """Run a stage `loo` (sections training, loo) whose body rewrites params.yaml `when` ("before" or
    "after" it publishes data/out) — as `dvc exp run --temp` does to the workspace while it stashes."""
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(textwrap.dedent(PARAMS))

    def body(cfg, run):
        if when == "before" and rewrite:
            params.write_text(textwrap.dedent(rewrite))
        with atomic_dir(tmp_path / "data" / "out") as out:
            (out / "x.txt").write_text(f"t = {cfg.training.t}\n")
            cfg.publish(out)
        if when == "after" and rewrite:
            params.write_text(textwrap.dedent(rewrite))
        return {}

    app = common.stage_app("loo", "A stage.", body, sections=["training", "loo"])
    monkeypatch.setenv("SUI_TRACKING", "off")
    return CliRunner().invoke(app, ["--params", str(params)])


def test_params_changed_while_the_stage_ran_publish_nothing(tmp_path, monkeypatch):
    result = _stage(tmp_path, monkeypatch, PARAMS.replace("t: 500", "t: 1000"), "before")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: training.t: changed while the loo stage ran (500.0 when it started, 1000.0 now): "
        "nothing was recorded; run the stage again"
    ]
    assert not (tmp_path / "data" / "out").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []  # no temporary folder left either


def test_params_changed_after_publishing_fail_the_stage(tmp_path, monkeypatch):
    """DVC records params after the stage exits: a change after the last rename must fail the stage, so
    DVC records (and caches) nothing for it."""
    result = _stage(tmp_path, monkeypatch, PARAMS.replace("lr: 0.01", "lr: 0.02"), "after")
    assert result.exit_code == 1, result.output
    assert "training.lr: changed while the loo stage ran (0.01 when it started, 0.02 now)" in result.stderr


def test_other_sections_may_change_while_a_stage_runs(tmp_path, monkeypatch):
    result = _stage(tmp_path, monkeypatch, PARAMS.replace("sigma: 1.0", "sigma: 3.0") + "# edited\n", "before")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "data" / "out" / "meta.json").read_text())
    assert meta["stage"] == "loo" and meta["lineage"]["training.t"] == 500.0
    assert "score.sigma" not in meta["lineage"]


def test_tracked_params_follow_dvc_yaml(tmp_path, monkeypatch):
    """A stage records (and checks) exactly the params dvc.yaml tracks for it, defaults filled in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(
        textwrap.dedent("""\
        stages:
          score:
            cmd: python -m stages.score
            params: [score, training.lr]
            outs: [data/scores]
    """)
    )
    (tmp_path / "params.yaml").write_text(textwrap.dedent(PARAMS))
    cfg = common.load_configs(["score", "training"], tmp_path / "params.yaml", "score")
    assert cfg.tracked == {"score": {"sigma": 1.0, "gallery_size": 10}, "training": {"lr": 0.01}}
    unlisted = common.load_configs(["score", "training"], tmp_path / "params.yaml", "another")
    assert set(unlisted.tracked) == {"score", "training"}
