"""The `khatri_rao` projection (sui_core.linearized.factors.KhatriRaoProjector): Φ computed from layer
factors against the explicit matrix of rank-one rows (u_s ⊗ v_s)/√p (and the Gaussian or identity
columns of the other tensors) applied to the jacrev per-sample Jacobian, unbiasedness of its kernel, its
params, determinism, its shards and the in-memory estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from sui_core.config import JacobianConfig, ModelConfig, load_section
from sui_core.errors import ParamError
from sui_core.io import file_sha256
from sui_core.linearized.estimate import linearize
from sui_core.linearized.factors import (
    CHUNK_VALUES,
    FACTORS,
    JACOBIAN,
    KhatriRaoProjector,
    batch_factors,
    factor_layout,
    kernel,
    make_store,
    model_projector,
)
from sui_core.linearized.jacobians import (
    DenseProjector,
    extract,
    load_split,
    make_projector,
    per_sample_jacobians,
    read_manifest,
    write_manifest,
)
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model

RTOL = 1e-10  # max |Φ − Φ_ref| / max |Φ_ref|, float64 throughout


def khatri_rao(dims: int, seed: int = 0) -> JacobianConfig:
    return JacobianConfig(projection="khatri_rao", dims_per_tensor=dims, seed=seed)


def mlp(k: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, k))


def normed(k: int = 2) -> nn.Module:
    """A LayerNorm between two Linears: its affine parameters are jacrev fallbacks (30 columns each)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 30), nn.LayerNorm(30), nn.Tanh(), nn.Linear(30, k))


def block_jacobians(projector: KhatriRaoProjector, jac: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The jacrev Jacobian per block of Φ: a factor layer's weight columns (dout, din) with the bias as
    one more column, (B, k, dout, a_dim); a materialized tensor's (B, k, numel)."""
    blocks = {}
    for name in projector.shapes:
        layer = projector.factor_layers.get(name)
        if layer is None:
            blocks[name] = jac[name].flatten(2)
            continue
        batch, k = next(iter(jac.values())).shape[:2]
        parts = [jac[layer.weight].reshape(batch, k, layer.out_dim, -1)] if layer.weight else []
        parts += [jac[layer.bias].unsqueeze(-1)] if layer.bias else []
        blocks[name] = torch.cat(parts, dim=-1)
    return blocks


def explicit_matrix(projector: KhatriRaoProjector, index: int, name: str) -> torch.Tensor:
    """Block `name`'s projection as one explicit (dim × numel) float64 matrix: a projected factor layer's
    rows torch.kron(u_s, v_s)/√p, I for a block kept whole, else the DenseProjector's Gaussian rows."""
    numel = math.prod(projector.shapes[name])
    if name in projector.projected:
        u, v = (t.double() for t in projector.rows(name))
        return torch.stack([torch.kron(u_s, v_s) for u_s, v_s in zip(u, v)]) / math.sqrt(len(u))
    if projector.dims[name] == numel:
        return torch.eye(numel, dtype=torch.float64)
    chunks = range(0, numel, projector.CHUNK_COLS)
    return torch.cat(
        [
            projector._chunk(index, c, min(projector.CHUNK_COLS, numel - lo), projector.dims[name])
            for c, lo in enumerate(chunks)
        ]
    ).T.double()


def assert_matches_explicit(model: nn.Module, x: torch.Tensor, dims: int) -> KhatriRaoProjector:
    """Φ from the factors, and `project` of the jacrev block Jacobians, both equal the explicit
    projection matrices applied to the jacrev per-sample Jacobian."""
    model, x = model.double().eval(), x.double()
    projector = make_store(khatri_rao(dims, seed=7), model, tuple(x.shape[1:]))
    assert isinstance(projector, KhatriRaoProjector)
    f0, phi = projector.jacobians(model, x, torch.float64)
    ref_f0, jac = per_sample_jacobians(model, x)
    blocks = block_jacobians(projector, jac)
    reference = torch.cat(
        [
            blocks[name].flatten(2) @ explicit_matrix(projector, index, name).T
            for index, name in enumerate(projector.shapes)
        ],
        dim=2,
    ).numpy()
    assert phi.shape == (len(x), ref_f0.shape[1], projector.total_dim) and phi.dtype == np.float64
    scale = np.abs(reference).max()
    assert np.abs(phi - reference).max() / scale < RTOL
    assert np.abs(projector.project(blocks).numpy() - reference).max() / scale < RTOL
    np.testing.assert_allclose(f0, ref_f0.numpy(), rtol=1e-12)
    return projector


@pytest.mark.parametrize("k", [1, 3])
def test_mlp_phi_is_the_explicit_khatri_rao_projection(k):
    torch.manual_seed(0)
    projector = assert_matches_explicit(mlp(k), torch.randn(5, 3, 4), dims=20)
    # 9 × 13 → 20 rows; 7 × 10 → 20 rows; the head: k = 1 its 7 + 1 columns whole (stored as a Jacobian
    # block), k = 3 as factors 3 × 8 → 20 rows (24 coordinates); each layer's U and V as drawn
    assert projector.projected == ["1", "3"] + (["5"] if k == 3 else [])
    for name, shape in [("1", (9, 13)), ("3", (7, 10)), ("5", (3, 8))][: len(projector.projected)]:
        u, v = projector.rows(name)
        assert projector.dims[name] == 20 and (u.shape, v.shape) == ((20, shape[0]), (20, shape[1]))
    if k == 1:
        assert projector.dims["5.weight"] == 7 and projector.dims["5.bias"] == 1
    drawn = sum(t.numel() for name in projector.projected for t in projector.rows(name))
    # what `sui plan` counts for the jacobians stage: U, V and one chunk of products, (B, k + 1, 1, p)
    assert projector.held_values(5) == drawn + 5 * (k + 1) * 20
    assert projector.held_values(CHUNK_VALUES) == drawn + CHUNK_VALUES * (k + 1)  # one row at a time


def test_a_block_of_at_most_p_coordinates_is_kept_whole():
    """p = 30: the head's 3 × 8 block is every coordinate (no rows drawn), the 9 × 13 and 7 × 10 get rows."""
    torch.manual_seed(5)
    projector = assert_matches_explicit(mlp(3), torch.randn(4, 3, 4), dims=30)
    assert projector.projected == ["1", "3"] and projector.dims["5"] == 24
    entries = {e["name"]: e["projection"] for e in projector.describe()["tensors"]}
    assert entries == {"1": "khatri_rao", "3": "khatri_rao", "5": "whole"}


def test_fallback_tensors_get_gaussian_rows_or_stay_whole():
    torch.manual_seed(1)
    projector = assert_matches_explicit(normed(), torch.randn(4, 12), dims=25)
    assert projector.layout.fallback == ("2.weight", "2.bias")
    entries = {e["name"]: e for e in projector.describe()["tensors"]}
    assert entries["2.weight"]["projection"] == "gaussian" and entries["2.weight"]["via"] == "jacrev"
    whole = make_store(khatri_rao(30), normed(), (12,))
    assert {e["name"]: e["projection"] for e in whole.describe()["tensors"]}["2.bias"] == "whole"


def test_paper_cnn_phi_is_the_explicit_khatri_rao_projection(monkeypatch):
    """Convolutions over 25 and 9 positions as factors, the first (100 positions) as its Jacobian block,
    whose weight (512 columns) gets Gaussian rows. CHUNK_VALUES small: the products are formed a few
    rows at a time."""
    monkeypatch.setattr("sui_core.linearized.factors.CHUNK_VALUES", 1000)
    model = build_model(ModelConfig(arch="cnn", init_seed=3), (1, 20, 20), 1)
    x = torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    projector = assert_matches_explicit(model, x, dims=64)
    stored = {layer.module: layer.stored for layer in projector.layout.layers}
    assert stored["0"] == JACOBIAN and stored["2"] == stored["4"] == FACTORS
    assert "2" in projector.projected and projector.dims["2"] == 64 and projector.dims["0.weight"] == 64
    assert projector._chunk_rows(len(x), 25) == 6  # layer 2's 64 rows in 11 chunks


def test_kernel_is_unbiased():
    """The mean of ΦΦᵀ over 200 seeds is the exact factor kernel within the seeds' own spread: each entry
    within z standard errors, z the two-sided normal quantile of 1e-3 shared by all entries."""
    torch.manual_seed(2)
    model, x = normed().double().eval(), torch.randn(4, 12, dtype=torch.float64)
    layout = factor_layout(model, (12,))
    factors = batch_factors(model, x, layout)
    exact = kernel(factors, factors)
    seeds = 200
    kernels = []
    for seed in range(seeds):
        _, phi = KhatriRaoProjector(layout, 25, seed).jacobians(model, x, torch.float64)
        rows = phi.reshape(-1, phi.shape[2])
        kernels.append(rows @ rows.T)
    kernels = np.stack(kernels)
    stderr = kernels.std(axis=0, ddof=1) / math.sqrt(seeds)
    assert np.all(stderr > 0)  # every entry is random
    upper = np.triu_indices(len(exact))
    bound = norm.isf(1e-3 / (2 * len(upper[0])))

    def z(mean: np.ndarray) -> np.ndarray:
        return np.abs((mean - exact) / stderr)[upper]

    assert np.all(z(kernels.mean(axis=0)) < bound), z(kernels.mean(axis=0))
    assert np.any(z(1.2 * kernels.mean(axis=0)) > bound)  # the check has teeth: a 20 % bias fails it


def test_bad_params_are_param_errors():
    model = mlp(1)
    for raw, key in [
        ({"projection": "khatri_rao", "dims_per_tensor": 0}, "jacobian.dims_per_tensor"),
        ({"projection": "kronecker"}, "jacobian.projection"),
    ]:
        with pytest.raises(ParamError, match=key):
            load_section({"jacobian": raw}, "jacobian")
    with pytest.raises(ParamError, match="jacobian.dims_per_tensor"):
        make_store(khatri_rao(0), model, (12,))
    with pytest.raises(ParamError, match="jacobian.seed"):
        make_store(khatri_rao(20, seed=-1), model, (12,))
    with pytest.raises(ValueError, match="model_projector"):
        make_projector(khatri_rao(20), {n: p.shape for n, p in model.named_parameters()})


def test_same_seed_same_bytes_other_seed_other_phi(tmp_path):
    """Two projectors of one seed give identical Φ bytes and shard files; another seed another Φ."""
    torch.manual_seed(3)
    model = mlp(3)
    x = np.random.default_rng(0).normal(size=(7, 3, 4)).astype(np.float32)
    ids = np.arange(7, dtype=np.int64)

    def shards(seed: int, out) -> tuple[list[dict], bytes]:
        out.mkdir()
        store = make_store(khatri_rao(20, seed), model, (3, 4))
        entries = extract(model, x, ids, store, out, "train", batch_size=3, shard_rows=4, progress=False)
        return entries, store.jacobians(model, torch.from_numpy(x))[1].tobytes()

    first, phi_first = shards(5, tmp_path / "a")
    again, phi_again = shards(5, tmp_path / "b")
    _, phi_other = shards(6, tmp_path / "c")
    assert phi_first == phi_again and [e["sha256"] for e in first] == [e["sha256"] for e in again]
    assert phi_first != phi_other
    assert file_sha256(tmp_path / "a/train-00000.parquet") != file_sha256(tmp_path / "c/train-00000.parquet")


def test_shards_and_manifest_are_those_of_a_projection(tmp_path):
    """The ntk stage reads khatri_rao shards as any projection's: a phi column (k, D) and the manifest's
    kind, seed, D and per factor layer its rows."""
    model = build_model(ModelConfig(arch="cnn"), (1, 20, 20), 3)
    x = np.random.default_rng(1).random((5, 1, 20, 20)).astype(np.float32)
    store = make_store(khatri_rao(50, seed=4), model, (1, 20, 20))
    entries = extract(model, x, np.arange(5), store, tmp_path, "train", batch_size=2, shard_rows=3, progress=False)
    write_manifest(tmp_path, store, 3, {"train": entries}, "m" * 64, "d" * 64)
    manifest = read_manifest(tmp_path)
    description = manifest["projection"]
    assert (description["kind"], description["seed"], description["D"]) == ("khatri_rao", 4, store.total_dim)
    layers = {e["name"]: e["dim"] for e in description["tensors"] if e["projection"] == "khatri_rao"}
    assert layers == {name: 50 for name in store.projected}
    assert set(layers) == {layer.module for layer in store.layout.layers if layer.stored == FACTORS}
    assert "columns" not in description and manifest["D"] == store.total_dim
    ids, f0, phi = load_split(tmp_path, "train")
    want_f0, want = store.jacobians(model, torch.from_numpy(x))  # one batch: float32 rounding differs
    assert np.array_equal(ids, np.arange(5)) and phi.shape == want.shape
    np.testing.assert_allclose(phi, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(f0, want_f0, rtol=1e-6)


def test_blocks_kept_whole_give_the_exact_estimate():
    """With p at least every block (every block and tensor kept whole), the in-memory estimate of
    `khatri_rao` is that of the exact kernel."""
    torch.manual_seed(4)
    model = mlp(2).double()
    x, x_val = torch.randn(12, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    y = np.random.default_rng(0).normal(size=(12, 2))
    projector = model_projector(khatri_rao(200), model, (3, 4))
    assert projector.projected == [] and projector.held_values(64) == 0
    assert projector.total_dim == factor_layout(model, (3, 4)).total_dim
    recipe = Recipe(0.05, 0.0, 300, "discrete")
    whole = linearize(model, x, x_val, khatri_rao(200)).estimate(y, recipe)
    exact = linearize(model, x, x_val, JacobianConfig(projection="exact")).estimate(y, recipe)
    np.testing.assert_allclose(whole.forms["fsi_sum"], exact.forms["fsi_sum"], rtol=1e-8)
    projected = linearize(model, x, x_val, khatri_rao(6)).estimate(y, recipe)
    assert not np.allclose(projected.forms["fsi_sum"], exact.forms["fsi_sum"], rtol=1e-3)


def test_dense_projector_keeps_its_gaussian_and_rademacher_entries():
    """DenseProjector draws Rademacher signs only for kind rademacher (khatri_rao's tensors are Gaussian)."""
    shapes = {"w": torch.Size([50])}
    signs = DenseProjector(shapes, 4, 0, "rademacher")._chunk(0, 0, 50, 4)
    assert set(torch.unique(signs * 2).tolist()) == {-1.0, 1.0}
    gaussian = DenseProjector(shapes, 4, 0, "khatri_rao")._chunk(0, 0, 50, 4)
    assert torch.equal(gaussian, DenseProjector(shapes, 4, 0, "gaussian")._chunk(0, 0, 50, 4))
