"""`sui plan`: its numbers against the real sizes of a tiny pipeline run, and its refusal path."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sui_core import plan as planning
from sui_core.config import load_params

SMALL = {
    "data": {"source": "sklearn_digits", "classes": [0, 1, 2], "max_train": 40, "label_noise": 0.1},
    "model": {"hidden": [16]},
    "jacobian": {"dims_per_tensor": 200, "shard_rows": 16},
    "training": {"lr": 0.05, "t": 50},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    Path("params.yaml").write_text(yaml.safe_dump(SMALL))
    return tmp_path


def sui(*args: str):
    from stages.cli import app

    return CliRunner().invoke(app, list(args))


def run_pipeline(*stages: str) -> None:
    for stage in stages:
        result = CliRunner().invoke(importlib.import_module(f"stages.{stage}").app, [])
        assert result.exit_code == 0, result.output


def test_plan_matches_a_tiny_run(project):
    import pyarrow.parquet as pq

    from sui_core.jacobians import read_manifest
    from sui_core.ntk import Basis

    before = planning.make_plan(load_params())
    assert before.shapes.source == "source"
    run_pipeline("prepare", "model", "jacobians", "ntk", "loo")
    plan = planning.make_plan(load_params())
    assert plan.shapes.source == "prepared"  # read from the Parquet metadata, the same numbers
    assert (plan.shapes.n, plan.shapes.dim, plan.shapes.k) == (before.shapes.n, before.shapes.dim, before.shapes.k)
    sizes = {s.stage: s for s in plan.stages}
    sh = plan.shapes

    # n, input shape, k, P, D: exactly what the stages found
    for split in ("train", "val", "test"):
        assert pq.read_metadata(f"data/prepared/{split}.parquet").num_rows == sh.n[split]
    manifest = read_manifest("data/jacobians")
    assert (manifest["k"], manifest["D"]) == (sh.k, sh.dim) == (3, 200 + 16 + 48 + 3)  # 64×16 weight, bias, 16×3 weight, bias
    import json
    assert json.loads(Path("data/model/model.json").read_text())["param_count"] == sh.param_count

    # Z: exact. The rank is planned as min(n·k, D), reached here: kernel space (n·k = 120 < D = 267),
    # the 120 per-output Jacobians are independent. (In primal space the k outputs share the last
    # layer's structure and the rank can fall below D: then the plan is an upper bound.)
    basis = Basis.load("data/ntk/basis.npz")
    assert basis.rank == sh.rank
    assert basis.z.nbytes == planning.z_bytes(sh.n["train"], sh.k, sh.rank)
    ntk_disk = sum(p.stat().st_size for p in Path("data/ntk").glob("*.npz"))
    # npz stores the arrays raw (np.savez, no compression) plus a header of ~128 B per array and zip entries
    assert sizes["ntk"].disk_bytes <= ntk_disk <= sizes["ntk"].disk_bytes + 8 * 1024

    # Jacobian shards: the plan counts the raw values (k·D float32 + k float64 + id per row): an upper
    # bound, as Parquet (snappy, dictionary) never stores a value in more than its raw bytes, plus a
    # footer per shard (schema, row-group stats: under 4 KiB here). What it compresses is the zeros:
    # pixels that are always 0 and ReLUs that are off give exact-zero Jacobian entries (for the 8×8
    # digits most of them); the other float32 values are noise-like mantissas that snappy cannot
    # shrink by more than about 2×. So the real size lies between half the non-zero bytes and the plan.
    from sui_core.jacobians import load_split

    shards = list(Path("data/jacobians").glob("*.parquet"))
    actual = sum(p.stat().st_size for p in shards)
    raw = planning.jacobian_shard_bytes(sh.n["train"] + sh.n["val"], sh.k, sh.dim)
    nonzero = sum(int(np.count_nonzero(load_split("data/jacobians", split)[2])) for split in ("train", "val"))
    assert sizes["jacobians"].disk_bytes == raw
    assert 4 * nonzero / 2 <= actual <= raw + 4096 * len(shards), (nonzero, raw, actual)

    # model.pt: the float32 state_dict plus torch.save's zip/pickle overhead (under 2 KiB per tensor)
    model_pt = Path("data/model/model.pt").stat().st_size
    assert sizes["model"].disk_bytes <= model_pt <= sizes["model"].disk_bytes + 2048 * 4

    # prepared: float32 inputs uncompressed are an upper bound (Parquet compresses the digits' zeros)
    prepared = sum(p.stat().st_size for p in Path("data/prepared").glob("*.parquet"))
    assert prepared <= sizes["prepare"].disk_bytes + 3 * 4096

    # forms.parquet: 8 float64/int64 columns
    forms = Path("data/loo/forms.parquet").stat().st_size
    assert sizes["loo"].disk_bytes / 2 <= forms <= sizes["loo"].disk_bytes + 8192

    # the peaks of ntk and loo are those the stages themselves plan (and print)
    from sui_core import ntk, scores

    assert sizes["ntk"].peak_bytes == ntk.planned_peak_bytes(sh.n["train"], 3, sh.dim, 16)
    assert sizes["loo"].peak_bytes >= scores.planned_peak_bytes(sh.n["train"], 3, basis.rank, 256)


def test_plan_prints_a_table(project):
    result = sui("plan", "--params", "params.yaml")
    assert result.exit_code == 0, result.output
    for stage in ("prepare", "model", "jacobians", "ntk", "loo"):
        assert f"\n{stage} " in result.stdout
    assert "fits" in result.stdout
    assert not Path("data/prepared").exists()  # nothing was run


def test_plan_reads_npz_headers(project):
    rng = np.random.default_rng(0)
    np.savez("mine.npz", X_train=rng.normal(size=(30, 5, 6)), y_train=np.arange(30) % 2,
             X_val=rng.normal(size=(7, 5, 6)), y_val=np.arange(7) % 2)
    params = {**SMALL, "data": {"source": "npz", "npz_path": "mine.npz"}}
    plan = planning.make_plan(params)
    assert plan.shapes.source == "npz headers"
    assert plan.shapes.n == {"train": 30, "val": 7, "test": 0}
    assert plan.shapes.input_shape == (1, 5, 6) and plan.shapes.k == 1


def test_plan_refuses_what_memory_cannot_hold(project, monkeypatch):
    monkeypatch.setattr(planning, "available_memory", lambda: 1000)
    result = sui("plan")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: plan: stage ") and "of memory" in line and "1000 B available" in line
    assert "lower " in line


def test_plan_refuses_what_the_disk_cannot_hold(project, monkeypatch):
    monkeypatch.setattr(planning, "free_disk", lambda path=".": 10)
    result = sui("plan")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "on disk" in lines[0] and "10 B free" in lines[0] and "lower " in lines[0]


def test_plan_bad_params(project):
    Path("params.yaml").write_text(yaml.safe_dump({**SMALL, "jacobian": {"dims_per_tensor": "many"}}))
    result = sui("plan")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: params.yaml: jacobian.dims_per_tensor")
