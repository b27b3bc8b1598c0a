"""Scaling out (DESIGN.md §4): jacobians and loo as several torch.distributed processes give the same
results as one — Φ and f0 the same bytes, scores equal to 1e-10 relative — and an error on any rank
stops the whole job with one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stages import distributed as dist
from sui_core.config import JacobianConfig, load_section
from sui_core.errors import DataError, ParamError
from sui_core.linearized.jacobians import (
    extract,
    iter_shard_columns,
    load_split,
    make_projector,
    shard_plan,
    write_manifest,
)
from sui_core.linearized.ntk import Basis
from sui_core.linearized.rows import contiguous_range
from sui_core.linearized.scores import loo_quadratic_forms, sgd_precision
from sui_core.linearized.solver import Recipe, trained_coefficients

ROOT = Path(__file__).resolve().parents[2]
SMALL = {
    "data": {"source": "sklearn_digits", "classes": [3, 8], "max_train": 120, "label_noise": 0.1},
    "model": {"hidden": [64]},
    # shards of 50 rows in batches of 32: the rank boundary falls inside a shard
    "jacobian": {"dims_per_tensor": 150, "batch_size": 32, "shard_rows": 50},
    "training": {"lr": 0.05, "t": 300},
    "compute": {"nproc": 1},
}
SCORES = ["fsi", "si_isotropic", "si_hessian", "si_sgd"]


# ---- pieces, in one process ----------------------------------------------------------------------


def test_contiguous_ranges_cover_the_samples_in_order():
    for n in range(0, 23):
        for world in range(1, 6):
            parts = [contiguous_range(n, rank, world) for rank in range(world)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        contiguous_range(5, 2, 2)


@pytest.mark.parametrize("n,shard_rows,batch_size", [(120, 50, 32), (10, 4, 3), (7, 100, 2), (2, 4, 3), (0, 4, 3)])
def test_shard_plan_computes_the_batches_of_one_process(n, shard_rows, batch_size):
    def batches(pieces):
        return [(lo, min(lo + batch_size, stop)) for _, start, stop in pieces for lo in range(start, stop, batch_size)]

    single = shard_plan(n, shard_rows, batch_size, 1)
    assert [(a, b) for _, a, b in single[0]] == [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]
    for world in (1, 2, 3, 5):
        plan = shard_plan(n, shard_rows, batch_size, world)
        pieces = [p for rank in plan for p in rank]
        assert [number for number, _, _ in pieces] == list(range(len(pieces)))
        assert [i for _, a, b in pieces for i in range(a, b)] == list(range(n))
        assert all((a // shard_rows) == ((b - 1) // shard_rows) for _, a, b in pieces)  # never across a shard
        assert batches(pieces) == batches(single[0])
        sizes = [len(batches(rank)) for rank in plan]
        assert max(sizes) - min(sizes) <= 1


def test_ranks_write_the_same_bytes_as_one_process(tmp_path):
    """extract(rank=r, world=2) for both ranks = extract() alone, sample for sample, byte for byte."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    x = np.random.default_rng(1).normal(size=(23, 3, 4)).astype(np.float32)
    ids = np.arange(500, 523, dtype=np.int64)
    proj = make_projector(JacobianConfig(dims_per_tensor=6, seed=3), {n: p.shape for n, p in model.named_parameters()})
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = extract(model, x, ids, proj, one, "train", batch_size=4, shard_rows=10, progress=False)
    entries = [
        e
        for rank in range(2)
        for e in extract(
            model, x, ids, proj, two, "train", batch_size=4, shard_rows=10, progress=False, rank=rank, world=2
        )
    ]
    assert [e["file"] for e in single] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert [e["rows"] for e in entries] == [10, 4, 6, 3]  # 7 batches, 4 + 3: rank 1 starts at sample 14
    for out, shards in ((one, single), (two, entries)):
        write_manifest(out, proj, 2, {"train": shards}, "m" * 64, "d" * 64)
    for a, b in zip(load_split(one, "train"), load_split(two, "train")):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def random_basis(n=40, k=2, r=15, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k, r))
    s = np.sort(np.linalg.eigvalsh(np.einsum("nkr,nkq->rq", z, z)))[::-1]
    g = rng.normal(size=(r, r))
    return Basis("primal", s, z, g @ g.T, 9, r), rng.normal(size=(n, k))


def test_sgd_covariance_summed_over_parts_matches_all_samples():
    basis, residual = random_basis()
    recipe = Recipe(lr=0.01, weight_decay=0.0, t=50, dynamics="discrete")
    partial = []

    def capture(a):
        partial.append(a)
        return a

    c = trained_coefficients(basis.s, basis.z, residual, recipe.full(40))
    parts = [range(0, 17), range(17, 40)]
    for part in parts:
        sgd_precision(basis, residual, recipe, 40, c, block_size=8, samples=part, all_reduce=capture)
    total = partial[0] + partial[1]
    whole = sgd_precision(basis, residual, recipe, 40, c)
    for part in parts:
        split = sgd_precision(basis, residual, recipe, 40, c, block_size=8, samples=part, all_reduce=lambda a: total)
        assert np.allclose(split, whole, rtol=1e-10, atol=1e-12 * np.abs(whole).max())
    with pytest.raises(ValueError, match="all_reduce"):
        sgd_precision(basis, residual, recipe, 40, c, samples=parts[0])
    forms = [
        (lambda res: res.forms | res.fit)(
            loo_quadratic_forms(
                basis, residual, recipe, None, block_size=8, progress=False, samples=part, all_reduce=lambda a: total
            )
        )
        for part in parts
    ]
    whole_result = loo_quadratic_forms(basis, residual, recipe, None, progress=False)
    reference = whole_result.forms | whole_result.fit
    for name, values in reference.items():
        joined = np.concatenate([f[name] for f in forms])
        assert np.allclose(joined, values, rtol=1e-10, atol=0), name


def test_one_process_helpers_are_identities():
    assert dist.world() == (0, 1) and dist.is_main()
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    summed = dist.all_reduce_sum(a)
    assert summed.dtype == np.float64 and np.array_equal(summed, a) and summed is not a
    assert dist.all_gather_objects({"x": 1}) == [{"x": 1}] and dist.gather_objects(2) == [2]
    assert dist.broadcast_object("p") == "p"
    assert dist.all_gather_checked(lambda: 3) == [3] and dist.run_checked(lambda: 4) == 4
    with pytest.raises(DataError, match="bad"):
        dist.run_checked(lambda: (_ for _ in ()).throw(DataError("bad")))
    dist.barrier(1.0)


def test_compute_nproc_is_validated(tmp_path, monkeypatch):
    assert load_section({}, "compute").nproc == 1
    with pytest.raises(ParamError, match="compute.nproc"):
        load_section({"compute": {"nproc": 0}}, "compute")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**SMALL, "compute": {"nproc": 0}}))
    from stages import loo

    result = CliRunner().invoke(loo.app, [])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["error: params.yaml: compute.nproc: must be >= 1, got 0"]


# ---- two processes, end to end -------------------------------------------------------------------


def env_for(project: Path, *extra_paths: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (*extra_paths, ROOT))
    env["SUI_TRACKING"] = "off"
    env.pop("OMP_NUM_THREADS", None)
    return env


def run(cmd: list[str], project: Path, expect: int = 0, *extra_paths: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=project, env=env_for(project, *extra_paths), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == expect, (
        f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def stage(name: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}"]


def shard_columns(folder: Path, split: str) -> dict[str, np.ndarray]:
    """Every column of a split's shards (sample ids, f0, factors), concatenated in sample order."""
    parts = list(iter_shard_columns(folder, split))
    columns = {"sample_id": np.concatenate([ids for ids, _ in parts])}
    return columns | {name: np.concatenate([cols[name] for _, cols in parts]) for name in parts[0][1]}


def set_nproc(project: Path, nproc: int, **training) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["compute"]["nproc"] = nproc
    params["training"].update(training)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    (one / "params.yaml").write_text(yaml.safe_dump(SMALL))
    for name in ("prepare", "model"):
        run(stage(name), one)
    shutil.copytree(one, two)
    set_nproc(two, 2)
    for name in ("jacobians", "ntk", "loo", "score"):
        run(stage(name), one)

    # jacobians through the stage's own launcher (compute.nproc = 2), loo through torchrun by hand
    out = run(stage("jacobians"), two).stderr
    assert "jacobians: 2 processes" in out and "done in" in out
    run(stage("ntk"), two)
    set_nproc(two, 1)  # under torchrun the world size comes from torchrun, not from the param
    out = run(
        [
            "torchrun",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--log-dir",
            str(tmp_path / "torchrun"),
            "-m",
            "stages.loo",
        ],
        two,
    ).stderr
    assert "loo: done in" in out and "(2 processes)" in out
    run(stage("score"), two)

    for split in ("train", "val"):  # projection exact (the default): every factor column, sample for sample
        a, b = (shard_columns(folder / "data/jacobians", split) for folder in (one, two))
        assert list(a) == list(b) and any(name.startswith("delta:") for name in a)
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    manifest = yaml.safe_load((two / "data/jacobians/manifest.json").read_text())
    assert len(manifest["shards"]["train"]) == 4  # a shard cut in two
    for name in ("jacobians", "loo"):  # how many processes made an output: beside it, not in it
        assert yaml.safe_load((two / f".sui/provenance/{name}.json").read_text())["processes"] == 2
    assert not [p for p in (two / "data").iterdir() if p.name.startswith(".")]  # no temporary folder left
    a = pq.read_table(one / "data/scores/scores.parquet")
    b = pq.read_table(two / "data/scores/scores.parquet")
    assert a.column("sample_id").equals(b.column("sample_id"))
    for name in SCORES:
        x, y = a.column(name).to_numpy(), b.column(name).to_numpy()
        assert np.all(np.abs(x - y) <= 1e-10 * np.abs(x)), (name, np.max(np.abs(x - y) / np.abs(x)))

    # an error every rank meets (a diverging lr) is printed once, and nothing is written
    shutil.rmtree(two / "data/loo")
    set_nproc(two, 2, lr=1000.0)
    proc = run(stage("loo"), two, expect=1)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "training.lr" in lines[0] and "diverges" in lines[0], proc.stderr
    assert not (two / "data/loo").exists()


FAKE_STAGE = '''\
"""A distributed stage whose last rank fails."""
import os
from stages.common import stage_app
from stages import distributed as dist
from sui_core.errors import DataError


def body(cfg, run):
    rank, world = dist.world()

    def work():
        if rank == world - 1:
            if os.environ["FAIL"] == "error":
                raise DataError(f"data/x.npz: bad rows on rank {rank}")
            raise RuntimeError("a bug")
        return rank

    if os.environ["FAIL"] == "bug":
        work()
    ranks = dist.all_gather_checked(work)
    dist.barrier()
    return {"ranks": len(ranks)}


app = stage_app("boom", __doc__, body, sections=[], distributed=True)
if __name__ == "__main__":
    app()
'''


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    (tmp_path / "fakedist").mkdir()
    (tmp_path / "fakedist" / "__init__.py").write_text("")
    (tmp_path / "fakedist" / "boom.py").write_text(textwrap.dedent(FAKE_STAGE))
    (tmp_path / "params.yaml").write_text("compute: {nproc: 2}\n")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fakedist.boom"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env_for(tmp_path, tmp_path), "FAIL": "error"},
    )
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc.stderr) == ["error: data/x.npz: bad rows on rank 1"], proc.stderr
    # a bug (not a SuiError) on one rank: its traceback, and the job still ends, non-zero
    proc = subprocess.run(
        [sys.executable, "-m", "fakedist.boom"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env_for(tmp_path, tmp_path), "FAIL": "bug"},
    )
    assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 60
