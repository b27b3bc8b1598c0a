"""Per-sample Jacobians against autograd, unbiasedness of the projections, and the shard round trip."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from sui_core.config import JacobianConfig
from sui_core.errors import ArtifactError
from sui_core.io import file_sha256
from sui_core.linearized.jacobians import (
    extract,
    iter_shards,
    load_split,
    make_projector,
    per_sample_jacobians,
    read_manifest,
    write_manifest,
)


def mlp(k: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, k))


def cnn(k: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(2 * 2 * 2, k)
    )


def autograd_jacobians(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one backward pass per sample and output."""
    names, params = zip(*model.named_parameters())
    rows = {name: [] for name in names}
    for xi in x:
        out = model(xi.unsqueeze(0)).reshape(-1)
        grads = [torch.autograd.grad(out[j], params, retain_graph=True) for j in range(len(out))]
        for name, per_output in zip(names, zip(*grads)):
            rows[name].append(torch.stack(per_output))
    return {name: torch.stack(r) for name, r in rows.items()}


@pytest.mark.parametrize("arch,shape", [(mlp, (3, 4)), (cnn, (1, 7, 7))])
@pytest.mark.parametrize("k", [1, 3])
def test_per_sample_jacobians_match_autograd(arch, shape, k):
    torch.manual_seed(0)
    model = arch(k).double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    f0, jac = per_sample_jacobians(model, x)
    assert torch.allclose(f0, model(x).reshape(5, k), atol=1e-6)
    ref = autograd_jacobians(model, x)
    assert list(jac) == list(ref)
    for name in ref:
        assert jac[name].shape == (5, k, *dict(model.named_parameters())[name].shape)
        assert torch.allclose(jac[name], ref[name], atol=1e-6), name


SHAPES = {"w1": torch.Size([6, 5]), "b1": torch.Size([6]), "w2": torch.Size([2, 3, 3])}


def two_sample_jacobians(k: int = 2) -> dict[str, torch.Tensor]:
    """Fixed Jacobians of two correlated samples, so that the exact kernel is far from zero."""
    gen = torch.Generator().manual_seed(1)
    first = {n: torch.randn(1, k, *s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
    return {
        n: torch.cat([j, j + 0.5 * torch.randn(j.shape, generator=gen, dtype=torch.float64)]) for n, j in first.items()
    }


def exact_kernel(jac: dict[str, torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([j.flatten(2) for j in jac.values()], dim=2)
    return flat[0] @ flat[1].T  # (k, k): Θ(x_0, x_1)


def assert_unbiased(projection: str, dims: int, seeds: int) -> None:
    jac = two_sample_jacobians()
    kernels = []
    for seed in range(seeds):
        cfg = JacobianConfig(projection=projection, dims_per_tensor=dims, seed=seed)
        phi = make_projector(cfg, SHAPES).project(jac)
        kernels.append(phi[0] @ phi[1].T)
    kernels = torch.stack(kernels)
    stderr = kernels.std(dim=0) / seeds**0.5
    assert torch.all(stderr > 0)  # the projection is random, so the check below has teeth
    z = (kernels.mean(dim=0) - exact_kernel(jac)) / stderr
    assert torch.all(z.abs() < 4), z


def test_coordinates_kernel_is_unbiased():
    assert_unbiased("coordinates", dims=4, seeds=2000)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_dense_kernel_is_unbiased(projection):
    assert_unbiased(projection, dims=4, seeds=400)


@pytest.mark.parametrize("projection", ["coordinates", "none"])
def test_all_coordinates_give_the_exact_kernel(projection):
    jac = two_sample_jacobians()
    proj = make_projector(JacobianConfig(projection=projection, dims_per_tensor=100, seed=3), SHAPES)
    assert proj.dims == {n: s.numel() for n, s in SHAPES.items()}
    phi = proj.project(jac)
    assert torch.equal(phi, torch.cat([j.flatten(2) for j in jac.values()], dim=2))
    assert torch.allclose(phi[0] @ phi[1].T, exact_kernel(jac))


def test_coordinates_dims_and_layout():
    proj = make_projector(JacobianConfig(projection="coordinates", dims_per_tensor=10, seed=0), SHAPES)
    assert proj.dims == {"w1": 10, "b1": 6, "w2": 10} and proj.total_dim == 26
    desc = proj.describe()
    assert [t["name"] for t in desc["tensors"]] == list(SHAPES)
    assert [t["offset"] for t in desc["tensors"]] == [0, 10, 16]
    # the w1 block holds 10 distinct coordinates of w1, scaled by sqrt(30/10)
    jac = {n: torch.arange(s.numel(), dtype=torch.float64).reshape(1, 1, *s) for n, s in SHAPES.items()}
    picked = proj.project(jac)[0, 0, :10] / 3**0.5
    assert len(set(picked.round().tolist())) == 10 and torch.allclose(picked, picked.round())


@pytest.mark.parametrize("projection", ["coordinates", "gaussian", "rademacher"])
def test_projection_is_deterministic_per_seed_and_batch_independent(projection):
    jac = {n: torch.randn(6, 2, *s) for n, s in SHAPES.items()}

    def project(seed, batch):
        proj = make_projector(JacobianConfig(projection=projection, dims_per_tensor=5, seed=seed), SHAPES)
        return proj.project(batch)

    assert torch.equal(project(0, jac), project(0, jac))
    assert not torch.allclose(project(0, jac), project(1, jac))
    split = torch.cat([project(0, {n: j[:2] for n, j in jac.items()}), project(0, {n: j[2:] for n, j in jac.items()})])
    assert torch.allclose(split, project(0, jac), rtol=1e-6, atol=1e-6)


def test_dense_projection_spans_chunks(monkeypatch):
    """A tensor wider than one chunk is projected by the same matrix as with one big chunk: no column lost."""
    from sui_core.linearized.jacobians import DenseProjector

    shapes = {"w": torch.Size([10, 3])}
    jac = {"w": torch.randn(3, 1, 10, 3, dtype=torch.float64)}
    proj = make_projector(JacobianConfig(projection="gaussian", dims_per_tensor=4, seed=0), shapes)
    monkeypatch.setattr(DenseProjector, "CHUNK_COLS", 7)
    matrix = torch.cat([proj._chunk(0, c, min(7, 30 - 7 * c), 4) for c in range(5)]).double()
    assert torch.allclose(proj.project(jac), jac["w"].flatten(2) @ matrix)


@pytest.fixture
def extracted(tmp_path):
    """Ten samples through a small CNN (k = 3), coordinates projection, shards of four rows."""
    torch.manual_seed(0)
    model = cnn(3)
    x = np.random.default_rng(0).normal(size=(10, 1, 7, 7)).astype(np.float32)
    ids = np.arange(100, 110, dtype=np.int64)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    proj = make_projector(JacobianConfig(projection="coordinates", dims_per_tensor=8, seed=5), shapes)
    entries = extract(model, x, ids, proj, tmp_path, "train", batch_size=3, shard_rows=4, progress=False)
    write_manifest(tmp_path, proj, 3, {"train": entries}, "m" * 64, "d" * 64)
    return tmp_path, model, x, ids, proj


def test_round_trip(extracted):
    out, model, x, ids, proj = extracted
    manifest = read_manifest(out)
    assert [e["rows"] for e in manifest["shards"]["train"]] == [4, 4, 2]
    assert manifest["D"] == proj.total_dim and manifest["k"] == 3
    assert manifest["projection"]["kind"] == "coordinates" and manifest["projection"]["seed"] == 5
    shards = list(iter_shards(out, "train"))
    assert [len(s[0]) for s in shards] == [4, 4, 2]
    sample_id, f0, phi = load_split(out, "train")
    xt = torch.from_numpy(x)
    assert np.array_equal(sample_id, ids)
    assert f0.dtype == np.float64 and phi.dtype == np.float32 and phi.shape == (10, 3, proj.total_dim)
    with torch.no_grad():
        assert np.allclose(f0, model(xt).numpy(), atol=1e-6)
    _, jac = per_sample_jacobians(model, xt)
    assert np.allclose(phi, proj.project(jac).numpy(), atol=1e-6)


def rewrite(path, table):
    pq.write_table(table, path)


def corrupt_content(out, manifest):
    path = out / "train-00001.parquet"
    table = pq.read_table(path)
    rewrite(path, table.set_column(0, "sample_id", pa.array(table.column("sample_id").to_numpy() + 1)))


def truncate(out, manifest):
    path = out / "train-00001.parquet"
    path.write_bytes(path.read_bytes()[:200])


def delete(out, manifest):
    (out / "train-00001.parquet").unlink()


def fewer_rows(out, manifest):
    """A coherent-looking manifest (sha256 updated) whose row count is wrong."""
    path = out / "train-00001.parquet"
    rewrite(path, pq.read_table(path).slice(0, 3))
    manifest["shards"]["train"][1]["sha256"] = file_sha256(path)


def wrong_dim(out, manifest):
    manifest["D"] += 1


def wrong_column(out, manifest):
    path = out / "train-00001.parquet"
    table = pq.read_table(path)
    rewrite(path, table.set_column(2, "phi", table.column("phi").cast(pa.list_(pa.float64()))))
    manifest["shards"]["train"][1]["sha256"] = file_sha256(path)


@pytest.mark.parametrize(
    "damage,expected",
    [
        (corrupt_content, "sha256"),
        (truncate, "sha256"),
        (delete, "missing"),
        (fewer_rows, "rows"),
        (wrong_dim, "D = "),
        (wrong_column, "'phi'"),
    ],
)
def test_shard_not_matching_manifest_is_an_artifact_error(extracted, damage, expected):
    out = extracted[0]
    manifest = json.loads((out / "manifest.json").read_text())
    damage(out, manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as err:
        load_split(out, "train")
    message = str(err.value)
    first_shard = "train-00000.parquet" if damage is wrong_dim else "train-00001.parquet"
    assert first_shard in message and expected in message and "\n" not in message, message


def test_unknown_split_is_an_artifact_error(extracted):
    with pytest.raises(ArtifactError, match="val"):
        list(iter_shards(extracted[0], "val"))
