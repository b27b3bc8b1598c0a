"""`sui plan`: its numbers against the real sizes of a tiny pipeline run, and its refusal path."""

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stages import plan as planning
from sui_core.config import load_params

SMALL = {
    "data": {"source": "sklearn_digits", "classes": [0, 1, 2], "max_train": 40, "label_noise": 0.1},
    "model": {"hidden": [16]},
    "jacobian": {"projection": "coordinates", "dims_per_tensor": 200, "shard_rows": 16},
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


DISK_TOLERANCE = 0.25  # relative error allowed between the plan's disk and the bytes really written


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def assert_close(planned: int, actual: int, what: str) -> None:
    assert abs(planned - actual) <= DISK_TOLERANCE * actual, f"{what}: planned {planned} B, wrote {actual} B"


def test_plan_matches_a_tiny_run(project):
    import pyarrow.parquet as pq

    from sui_core.linearized.jacobians import read_manifest
    from sui_core.linearized.ntk import Basis

    before = planning.make_plan(load_params("params.yaml"))
    assert before.shapes.source == "source"
    run_pipeline("prepare", "model", "jacobians", "ntk", "loo")
    plan = planning.make_plan(load_params("params.yaml"))
    assert plan.shapes.source == "prepared"  # read from the Parquet metadata, the same numbers
    assert (plan.shapes.n, plan.shapes.dim, plan.shapes.k) == (before.shapes.n, before.shapes.dim, before.shapes.k)
    sizes = {s.stage: s for s in plan.stages}
    sh = plan.shapes

    # n, input shape, k, P, D: exactly what the stages found
    for split in ("train", "val", "test"):
        assert pq.read_metadata(f"data/prepared/{split}.parquet").num_rows == sh.n[split]
    manifest = read_manifest("data/jacobians")
    assert (
        (manifest["k"], manifest["D"]) == (sh.k, sh.dim) == (3, 200 + 16 + 48 + 3)
    )  # 64×16 weight, bias, 16×3 weight, bias
    import json

    assert json.loads(Path("data/model/model.json").read_text())["param_count"] == sh.param_count

    # Z: exact. The rank is planned as min(n·k, D), reached here: kernel space (n·k = 120 < D = 267),
    # the 120 per-output Jacobians are independent. (In primal space the k outputs share the last
    # layer's structure and the rank can fall below D: then the plan is an upper bound.)
    basis = Basis.load("data/ntk/basis.npz")
    assert basis.rank == sh.rank
    assert basis.z.nbytes == planning.z_bytes(sh.n["train"], sh.k, sh.rank)

    # disk: what each stage's folder really holds, within DISK_TOLERANCE, planned before the run (from
    # the source) and after it (from data/prepared). Parquet's compression is measured on a sample;
    # plots and meta files are an allowance.
    for made in (before, plan):
        planned = {s.stage: s.disk_bytes for s in made.stages}
        for stage in ("prepare", "model", "jacobians", "ntk", "loo"):
            folder = {"prepare": "prepared"}.get(stage, stage)
            assert_close(planned[stage], folder_bytes(f"data/{folder}"), f"{stage} (from {made.shapes.source})")
    # the shards do compress (exact zeros: blank pixels, ReLUs that are off): raw values would overstate
    raw = planning.jacobian_shard_bytes(sh.n["train"] + sh.n["val"], sh.k, sh.k * sh.dim)
    assert folder_bytes("data/jacobians") < 0.75 * raw
    assert not plan.cache.copies and plan.disk_bytes == plan.outputs_bytes  # no DVC here: nothing cached

    # the peaks of ntk and loo are those the stages themselves plan (and print)
    from sui_core.linearized import ntk, scores

    assert sizes["ntk"].peak_bytes == ntk.planned_peak_bytes(sh.n["train"], 3, sh.dim, 16)
    assert sizes["loo"].peak_bytes >= scores.planned_peak_bytes(sh.n["train"], 3, basis.rank, 256)


EXACT = {**SMALL, "jacobian": {"projection": "exact", "shard_rows": 16}}


def test_plan_of_the_exact_kernel_matches_a_tiny_run(project):
    """projection exact: D is every trained parameter, a shard row holds the layer factors, and the ntk
    stage's peak is the kernel's own plan."""
    from sui_core.linearized import ntk
    from sui_core.linearized.factors import values_per_sample
    from sui_core.linearized.jacobians import read_manifest
    from sui_core.linearized.ntk import Basis

    Path("params.yaml").write_text(yaml.safe_dump(EXACT))
    before = planning.make_plan(load_params("params.yaml"))
    run_pipeline("prepare", "model", "jacobians", "ntk")
    sh = before.shapes
    manifest = read_manifest("data/jacobians")
    assert sh.exact and manifest["D"] == sh.dim == 64 * 16 + 16 + 16 * 3 + 3
    assert values_per_sample(manifest["projection"]) == sh.stored_values < sh.k * sh.dim
    basis = Basis.load("data/ntk/basis.npz")
    assert basis.rank == sh.rank == sh.n["train"] * 3 and basis.val_rows.shape == (sh.n["val"], 3, sh.rank)
    planned = {s.stage: s for s in before.stages}
    for stage in ("jacobians", "ntk"):
        assert_close(planned[stage].disk_bytes, folder_bytes(f"data/{stage}"), stage)
    n_val = sh.n["val"]
    expected = ntk.planned_kernel_peak_bytes(sh.n["train"], 3, n_val, min(16, n_val), sh.stored_values)
    assert planned["ntk"].peak_bytes == expected


def test_the_exact_kernel_that_does_not_fit_is_refused_alike_by_plan_and_ntk(project, monkeypatch):
    Path("params.yaml").write_text(yaml.safe_dump(EXACT))
    run_pipeline("prepare", "model", "jacobians")
    monkeypatch.setattr(planning, "available_memory", lambda: 2**20)
    result = sui("plan")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("error: params.yaml: jacobian.projection: exact: the 120×120 kernel") and "\n" not in line
    assert "0.0 GiB available; use jacobian.projection: khatri_rao" in line
    stage = CliRunner().invoke(importlib.import_module("stages.ntk").app, [])
    assert stage.exit_code == 1 and stage.stderr.strip() == line
    assert not Path("data/ntk").exists()


def test_plan_prints_a_table(project):
    result = sui("plan", "--params", "params.yaml")
    assert result.exit_code == 0, result.output
    for stage in ("prepare", "model", "jacobians", "ntk", "loo"):
        assert f"\n{stage} " in result.stdout
    assert "fits" in result.stdout
    assert not Path("data/prepared").exists()  # nothing was run


def test_plan_reads_npz_headers(project):
    rng = np.random.default_rng(0)
    np.savez(
        "mine.npz",
        X_train=rng.normal(size=(30, 5, 6)),
        y_train=np.arange(30) % 2,
        X_val=rng.normal(size=(7, 5, 6)),
        y_val=np.arange(7) % 2,
    )
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
    assert "shard_rows" not in lines[0] and "batch_size" not in lines[0]  # they change memory, not disk


# a smaller value of each param the disk advice may name: each must shrink the stage that names it
SMALLER = {
    "data.max_train": 20,
    "data.classes": [0, 1],
    "data.val_fraction": 0.1,
    "jacobian.dims_per_tensor": 50,
    "model.hidden": [8],
    "validate.samples": 10,
    "validate.lds_subsets": 2,
}
MEMORY_ONLY = {"jacobian.shard_rows": 32, "jacobian.batch_size": 8, "loo.block_size": 16}


def with_param(params: dict, dotted: str, value) -> dict:
    section, key = dotted.split(".")
    return {**params, section: {**params.get(section, {}), key: value}}


def test_disk_advice_names_only_params_that_change_disk_use(project):
    params = {**SMALL, "validate": {"enabled": True, "samples": 20}}
    base = planning.make_plan(params)
    named = set()
    for stage in base.stages:
        if stage.disk_bytes <= planning.SMALL_FILES[stage.stage]:
            continue  # writes nothing but its meta.json here (pretrain with model.pretrain off)
        for dotted in re.findall(r"\b[a-z]+\.[a-z_]+\b", stage.lower_disk):
            named.add(dotted)
            assert dotted in SMALLER, f"{stage.stage}: advice names {dotted}"
            smaller = planning.make_plan(with_param(params, dotted, SMALLER[dotted]))
            after = {s.stage: s.disk_bytes for s in smaller.stages}[stage.stage]
            assert after < stage.disk_bytes, f"{stage.stage}: {dotted} = {SMALLER[dotted]} does not shrink it"
    assert {"data.max_train", "jacobian.dims_per_tensor"} <= named
    for dotted, value in MEMORY_ONLY.items():  # memory, not disk: never advised, (almost) no effect
        assert dotted not in " ".join(s.lower_disk for s in base.stages)
        other = planning.make_plan(with_param(params, dotted, value)).outputs_bytes
        assert abs(other - base.outputs_bytes) < 0.05 * base.outputs_bytes, dotted


def reflinks_here() -> bool:
    """What `cp --reflink=always` says about this file system (independent of the plan's own probe)."""
    import subprocess

    Path("probe").write_bytes(b"x" * 4096)
    try:
        return subprocess.run(["cp", "--reflink=always", "probe", "probe2"], capture_output=True).returncode == 0
    finally:
        for name in ("probe", "probe2"):
            Path(name).unlink(missing_ok=True)


def test_disk_refusal_counts_dvcs_cache_copy(project, monkeypatch):
    """DVC's default cache type (reflink,copy) copies every output into .dvc/cache where reflinks are
    not supported; the plan counts that copy and says how to avoid it."""
    Path(".dvc").mkdir()
    Path(".dvc/config").write_text("")
    plan = planning.make_plan(load_params("params.yaml"))
    assert plan.cache.copies == (not reflinks_here())
    if not plan.cache.copies:
        pytest.skip("this file system has reflinks: DVC's default cache type makes no second copy here")
    assert plan.disk_bytes == 2 * plan.outputs_bytes
    monkeypatch.setattr(planning, "free_disk", lambda path=".": plan.outputs_bytes + 1)  # outputs alone fit
    result = sui("plan")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "DVC's cache copy" in line and "dvc config cache.type hardlink,symlink" in line, line
    Path(".dvc/config").write_text("[cache]\n    type = hardlink,symlink\n")
    assert planning.make_plan(load_params("params.yaml")).disk_bytes == plan.outputs_bytes


@pytest.mark.slow
def test_plan_disk_matches_a_dvc_repro(tmp_path, monkeypatch):
    """The real use: `sui plan` before `dvc repro` in a fresh project, against what the run left on disk:
    each stage's output folder, and the growth of .dvc/cache (DVC's default cache type, a copy here)."""
    from pipeline_project import make_project, run

    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    monkeypatch.setenv("SUI_TRACKING", "off")
    plan = planning.make_plan(load_params("params.yaml"))
    assert plan.shapes.source == "source"
    cache_before = folder_bytes(".dvc/cache")
    run(["dvc", "repro"], project)
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    with_outputs = {name: stage["outs"] for name, stage in stages.items() if stage.get("outs")}
    assert set(with_outputs) == {s.stage for s in plan.stages}  # the plan knows every stage that writes
    written = {name: sum(folder_bytes(out) for out in outs) for name, outs in with_outputs.items()}
    for stage in plan.stages:  # outputs of a few KiB are mostly meta.json: 4 KiB of slack
        assert abs(stage.disk_bytes - written[stage.stage]) <= max(DISK_TOLERANCE * written[stage.stage], 4096), (
            f"{stage.stage}: planned {stage.disk_bytes} B, wrote {written[stage.stage]} B"
        )
    assert_close(plan.outputs_bytes, sum(written.values()), "all outputs")
    # the cache type in effect: is the cached copy of an output another file (a copy) or the same one?
    import hashlib

    basis = Path("data/ntk/basis.npz")
    md5 = hashlib.md5(basis.read_bytes()).hexdigest()
    cached = Path(".dvc/cache/files/md5") / md5[:2] / md5[2:]
    copied = not cached.is_symlink() and not basis.is_symlink() and not basis.samefile(cached)
    assert plan.cache.copies == (copied and not reflinks_here())
    assert_close(plan.cache_bytes, folder_bytes(".dvc/cache") - cache_before, "DVC cache growth")
    assert_close(plan.disk_bytes, sum(written.values()) + folder_bytes(".dvc/cache") - cache_before, "total")


def test_plan_bad_params(project):
    Path("params.yaml").write_text(yaml.safe_dump({**SMALL, "jacobian": {"dims_per_tensor": "many"}}))
    result = sui("plan")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: params.yaml: jacobian.dims_per_tensor")
