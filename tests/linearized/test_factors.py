"""The exact kernel from layer factors (sui_core.linearized.factors) against the kernel of full per-sample
Jacobians from torch.func.jacrev, its shards, the kernel-space basis built from kernels, and the ntk
stage's basis for `exact` against the one for `none`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn
from torch.func import functional_call, jacrev, vmap

from sui_core.config import JacobianConfig, ModelConfig
from sui_core.errors import ArtifactError, ParamError
from sui_core.io import file_sha256
from sui_core.linearized.factors import (
    FACTORS,
    JACOBIAN,
    FactorLayout,
    batch_factors,
    factor_layout,
    iter_factor_shards,
    kernel,
    load_factors,
    make_store,
)
from sui_core.linearized.jacobians import IdentityProjector, extract, iter_shards, outputs_at_w0, write_manifest
from sui_core.linearized.ntk import (
    Basis,
    basis_from_kernels,
    build_basis,
    check_kernel_fits,
    planned_kernel_peak_bytes,
    val_rows_from_cross,
)
from sui_core.network.models import build_model

RTOL = 1e-10  # max |K − K_ref| / max |K_ref|, float64 throughout


def reference_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, k, P): every trained parameter's column of each sample's Jacobian, by torch.func.jacrev."""
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    fixed = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def outputs(params, xi):
        return functional_call(model, (params, fixed, buffers), (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(outputs), in_dims=(None, 0))(trained, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_exact(model: nn.Module, x: torch.Tensor, x_other: torch.Tensor) -> FactorLayout:
    """The factor kernel of x with itself and with x_other, at the default and at tiny blocks, equals the
    jacrev kernel; the materialized columns equal the jacrev columns of those parameters."""
    model, x, x_other = model.double().eval(), x.double(), x_other.double()
    layout = factor_layout(model, x.shape[1:])
    f, g = batch_factors(model, x, layout), batch_factors(model, x_other, layout)
    jac, jac_other = reference_jacobians(model, x), reference_jacobians(model, x_other)
    k = jac.shape[1]
    rows, rows_other = jac.reshape(-1, jac.shape[2]), jac_other.reshape(-1, jac.shape[2])
    for block_bytes in (2**28, 4000):  # one block; many (and the symmetric pairs mirrored)
        assert relative_error(kernel(f, f, block_bytes), (rows @ rows.T).numpy()) < RTOL
        assert relative_error(kernel(g, f, block_bytes), (rows_other @ rows.T).numpy()) < RTOL
    with torch.no_grad():
        np.testing.assert_allclose(f.f0, model(x).reshape(len(x), k).numpy(), rtol=1e-12)
    offsets = dict(zip(layout.shapes, np.cumsum([0, *(np.prod(s, dtype=int) for s in layout.shapes.values())])))
    columns = np.concatenate(
        [np.arange(offsets[n], offsets[n] + np.prod(layout.shapes[n], dtype=int)) for n in layout.materialized] or [[]]
    ).astype(int)
    np.testing.assert_allclose(f.phi, jac[:, :, columns].numpy(), rtol=1e-12, atol=1e-14)
    assert layout.total_dim == jac.shape[2] and layout.k == k
    return layout


class Tokens(nn.Module):
    """A Linear over several positions per sample: (B, 12) -> (B, 3, 4) -> Linear(4, 5) -> (B, 15)."""

    def __init__(self, k: int):
        super().__init__()
        self.tokens, self.head = nn.Linear(4, 5), nn.Linear(15, k)

    def forward(self, x):
        return self.head(torch.tanh(self.tokens(x.reshape(len(x), 3, 4))).flatten(1))


@pytest.mark.parametrize("k", [1, 3])
def test_mlp_kernel_is_exact(k):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, k))
    layout = assert_exact(model, torch.randn(6, 3, 4), torch.randn(4, 3, 4))
    assert [(la.module, la.stored, la.positions) for la in layout.layers] == [
        ("1", FACTORS, 1),
        ("3", FACTORS, 1),
        ("5", FACTORS if k == 3 else JACOBIAN, 1),  # k = 1: 7 + 1 + 1 values are more than its 8 weights
    ]
    assert layout.fallback == ()


@pytest.mark.parametrize("k", [1, 2])
def test_linear_over_positions_is_exact(k):
    torch.manual_seed(1)
    layout = assert_exact(Tokens(k), torch.randn(5, 12), torch.randn(3, 12))
    assert layout.layers[0].module == "tokens" and layout.layers[0].positions == 3


@pytest.mark.parametrize("k", [1, 3])
def test_paper_cnn_kernel_is_exact(k):
    """Convolutions stored both ways: the first (100 pixels, 16 inputs) as its Jacobian, the others as factors."""
    model = build_model(ModelConfig(arch="cnn", init_seed=3), (1, 20, 20), k)
    gen = torch.Generator().manual_seed(0)
    layout = assert_exact(model, torch.rand(4, 1, 20, 20, generator=gen), torch.rand(3, 1, 20, 20, generator=gen))
    stored = {la.module: (la.type, la.stored, la.positions) for la in layout.layers}
    assert stored["0"] == ("conv2d", JACOBIAN, 100)
    assert stored["2"] == ("conv2d", FACTORS, 25) and stored["4"] == ("conv2d", FACTORS, 9)


def test_resnet18_with_trained_batch_norm_is_exact():
    """Batch-norm affine parameters (and their non-trivial running statistics) go through jacrev; the
    convolutions over 64 and 16 positions through factors; ReLU(inplace=True) follows many of them."""
    model = build_model(ModelConfig(arch="resnet18", init_seed=0), (3, 32, 32), 2)
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for t in (module.weight, module.bias, module.running_mean):
                t.data = torch.randn(t.shape, generator=gen) * 0.3 + (t is module.weight)
            module.running_var.data = torch.rand(module.running_var.shape, generator=gen) + 0.5
    layout = assert_exact(model, torch.randn(3, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen))
    assert set(layout.fallback) == {n for n, _ in model.named_parameters() if ".bn" in n or n.startswith("bn")} | {
        n for n, _ in model.named_parameters() if "downsample.1" in n
    }
    stored = {la.module: (la.stored, la.positions) for la in layout.layers}
    assert stored["layer1.0.conv1"] == (FACTORS, 64) and stored["layer2.0.conv1"] == (FACTORS, 16)
    assert stored["conv1"] == (JACOBIAN, 256) and stored["fc"] == (FACTORS, 1)


def test_frozen_parameters_get_no_columns():
    """A frozen weight with a trained bias keeps only ã = 1; a fully frozen layer is no layer at all."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 2))
    model[1].weight.requires_grad_(False)
    for p in model[3].parameters():
        p.requires_grad_(False)
    layout = assert_exact(model, torch.randn(5, 3, 4), torch.randn(2, 3, 4))
    assert list(layout.shapes) == ["1.bias", "5.weight", "5.bias"] and layout.total_dim == 9 + 16
    first = layout.layers[0]
    assert (first.module, first.weight, first.bias, first.a_dim) == ("1", None, "1.bias", 1)
    assert [la.module for la in layout.layers] == ["1", "5"]


class Unsupported(nn.Module):
    """Everything the factors do not cover, beside one Linear they do."""

    def __init__(self, k: int):
        super().__init__()
        self.grouped = nn.Conv2d(2, 4, 3, groups=2)
        self.reflect = nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect")
        self.norm = nn.LayerNorm(48)
        self.shared = nn.Linear(48, 48)  # called twice per forward
        self.tied, self.tied_again = nn.Linear(48, 20), nn.Linear(48, 20)
        self.tied_again.weight = self.tied.weight  # one parameter, two modules
        self.head = nn.Linear(20, k)

    def forward(self, x):
        h = torch.tanh(self.reflect(torch.tanh(self.grouped(x)))).flatten(1)
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.norm(h)))))
        return self.head(torch.tanh(self.tied(h)) * torch.sigmoid(self.tied_again(h)))


@pytest.mark.parametrize("k", [1, 3])
def test_unsupported_layers_fall_back_to_jacrev(k):
    torch.manual_seed(3)
    layout = assert_exact(Unsupported(k), torch.randn(4, 2, 6, 6), torch.randn(3, 2, 6, 6))
    assert [la.module for la in layout.layers] == ["head"]
    assert layout.fallback == tuple(name for name in layout.shapes if not name.startswith("head."))
    # named_parameters lists the shared weight once, as tied.weight
    assert "tied_again.bias" in layout.fallback and "tied_again.weight" not in layout.shapes


def test_make_store_chooses_factors_only_for_exact():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    assert isinstance(make_store(JacobianConfig(projection="exact"), model, (4,)), FactorLayout)
    assert isinstance(make_store(JacobianConfig(projection="none"), model, (4,)), IdentityProjector)
    assert make_store(JacobianConfig(projection="coordinates", dims_per_tensor=2), model, (4,)).kind == "coordinates"


def test_layout_on_the_meta_device_is_the_same():
    """`sui plan` builds the network on the meta device: the layout needs no values."""
    cfg = ModelConfig(arch="cnn")
    real = factor_layout(build_model(cfg, (1, 20, 20), 3), (1, 20, 20))
    with torch.device("meta"):
        meta = factor_layout(build_model(cfg, (1, 20, 20), 3), (1, 20, 20))
    assert meta == real


# ---- shards --------------------------------------------------------------------------------------


@pytest.fixture
def factor_shards(tmp_path):
    """Eleven samples through the paper's CNN (k = 3), exact, shards of four rows in batches of three."""
    model = build_model(ModelConfig(arch="cnn"), (1, 20, 20), 3)
    x = np.random.default_rng(0).random((11, 1, 20, 20)).astype(np.float32)
    ids = np.arange(40, 51, dtype=np.int64)
    layout = factor_layout(model, (1, 20, 20))
    entries = extract(model, x, ids, layout, tmp_path, "train", batch_size=3, shard_rows=4, progress=False)
    write_manifest(tmp_path, layout, 3, {"train": entries}, "m" * 64, "d" * 64)
    return tmp_path, model, x, ids, layout


def test_factor_shards_round_trip(factor_shards):
    out, model, x, ids, layout = factor_shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["projection"]["kind"] == "exact" and manifest["D"] == layout.total_dim
    assert [e["rows"] for e in manifest["shards"]["train"]] == [4, 4, 3]
    got_ids, factors = load_factors(out, "train")
    assert np.array_equal(got_ids, ids) and factors.phi.dtype == np.float32
    expected = batch_factors(model, torch.from_numpy(x), layout)
    assert relative_error(kernel(factors, factors), kernel(expected, expected)) < 1e-6  # float32 as stored
    assert np.array_equal(outputs_at_w0(out, "train")[0], ids)
    # float32 in batches of 3 against one batch of 11: BLAS may block the sums differently (seen once on CI: 7e-9
    # absolute on an output of 5e-3), so the tolerance is relative to the outputs' scale, not to each output
    scale = np.abs(expected.f0).max()
    np.testing.assert_allclose(outputs_at_w0(out, "train")[1], expected.f0, rtol=1e-6, atol=1e-6 * scale)
    with pytest.raises(ArtifactError, match="layer factors"):
        next(iter_shards(out, "train"))


def test_a_damaged_factor_column_is_an_artifact_error(factor_shards):
    out = factor_shards[0]
    manifest = json.loads((out / "manifest.json").read_text())
    path = out / "train-00001.parquet"
    table = pq.read_table(path)
    name = next(n for n in table.column_names if n.startswith("delta:"))
    column = table.column(name).combine_chunks()
    shorter = pa.ListArray.from_arrays(pa.array(column.offsets.to_numpy() // 2), column.flatten())
    pq.write_table(table.set_column(table.column_names.index(name), name, shorter), path)
    manifest["shards"]["train"][1]["sha256"] = file_sha256(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as err:
        list(iter_factor_shards(out, "train"))
    assert "train-00001.parquet" in str(err.value) and repr(name) in str(err.value)


# ---- the basis from kernels ----------------------------------------------------------------------


def test_basis_from_kernels_is_build_basis_in_kernel_space(make_problem):
    phi, _, phi_val = make_problem(n=8, k=2, dim=40, seed=0, n_val=5)
    rows, rows_val = phi.reshape(16, 40), phi_val.reshape(10, 40)
    from_phi = build_basis(lambda: np.array_split(phi, 3), lambda: np.array_split(phi_val, 2), 8, 2, 40)
    blocks = [rows_val[:6], rows_val[6:]]  # the same validation blocks: 3 and 2 samples
    from_kernels = basis_from_kernels(rows @ rows.T, [b @ rows.T for b in blocks], 8, 2, 5, 40)
    assert from_phi.space == from_kernels.space == "kernel" and from_phi.val_rows is None
    for name in ("s", "z", "gram_val"):
        assert np.array_equal(getattr(from_phi, name), getattr(from_kernels, name)), name
    assert (from_kernels.n_val, from_kernels.dim) == (5, 40)
    whole = basis_from_kernels(rows @ rows.T, rows_val @ rows.T, 8, 2, 5, 40)  # one block
    np.testing.assert_allclose(whole.gram_val, from_kernels.gram_val, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(whole.val_rows, from_kernels.val_rows, rtol=1e-12, atol=1e-12)
    with pytest.raises(ArtifactError, match="expected 6 validation samples"):
        basis_from_kernels(rows @ rows.T, rows_val @ rows.T, 8, 2, 6, 40)
    with pytest.raises(ArtifactError, match="expected 9 training samples"):
        basis_from_kernels(rows @ rows.T, rows_val @ rows.T, 9, 2, 5, 40)


def test_val_rows_from_cross_in_both_spaces(make_problem):
    # primal (D = 12 ≤ nk = 20): W = Φ_val Q, Q the eigenvectors of ΦᵀΦ (signs as Z = ΦQ has them)
    phi, _, phi_val = make_problem(n=10, k=2, dim=12, seed=1, n_val=4)
    rows, rows_val = phi.reshape(20, 12), phi_val.reshape(8, 12)
    basis = build_basis(lambda: [phi], lambda: [phi_val], 10, 2, 12)
    assert basis.space == "primal"
    _, q = np.linalg.eigh(rows.T @ rows)
    q = q[:, ::-1][:, : basis.rank]
    q *= np.sign(np.sum((rows @ q) * basis.z.reshape(20, -1), axis=0))
    np.testing.assert_allclose(basis.z.reshape(20, -1), rows @ q, atol=1e-10)
    w = val_rows_from_cross(rows_val @ rows.T, basis.z, basis.s)
    np.testing.assert_allclose(w.reshape(8, -1), rows_val @ q, atol=1e-10)
    np.testing.assert_allclose(w.reshape(8, -1).T @ w.reshape(8, -1), basis.gram_val, atol=1e-9)
    # kernel (D = 30 > nk = 12): the val_rows basis_from_kernels keeps
    phi, _, phi_val = make_problem(n=6, k=2, dim=30, seed=2, n_val=4)
    rows, rows_val = phi.reshape(12, 30), phi_val.reshape(8, 30)
    kernel_basis = basis_from_kernels(rows @ rows.T, rows_val @ rows.T, 6, 2, 4, 30)
    w = val_rows_from_cross(rows_val @ rows.T, kernel_basis.z, kernel_basis.s)
    np.testing.assert_allclose(w, kernel_basis.val_rows, rtol=1e-10, atol=1e-12)


def test_basis_file_has_val_rows_only_when_the_basis_does(tmp_path, make_problem):
    phi, _, phi_val = make_problem(n=6, k=2, dim=30, seed=3, n_val=4)
    rows, rows_val = phi.reshape(12, 30), phi_val.reshape(8, 30)
    basis = basis_from_kernels(rows @ rows.T, rows_val @ rows.T, 6, 2, 4, 30)
    basis.save(tmp_path / "with.npz")
    loaded = Basis.load(tmp_path / "with.npz")
    assert np.array_equal(loaded.val_rows, basis.val_rows) and loaded.val_rows.shape == (4, 2, basis.rank)
    bare = Basis(basis.space, basis.s, basis.z, basis.gram_val, basis.n_val, basis.dim)
    bare.save(tmp_path / "without.npz")
    assert Basis.load(tmp_path / "without.npz").val_rows is None
    with np.load(tmp_path / "without.npz") as z:
        assert z.files == ["space", "s", "z", "gram_val", "n_val", "dim"]  # the file as it always was


# ---- memory --------------------------------------------------------------------------------------


def test_the_exact_kernel_of_20000_rows_fits_a_24_gib_machine():
    """n·k = 20,000 (MNIST MLP factors: 2,835 values a sample; a quarter as many validation samples)."""
    peak = planned_kernel_peak_bytes(20_000, 1, 5_000, 2048, 2835)
    assert peak < 0.75 * 24 * 2**30
    check_kernel_fits(20_000, 1, peak, 20 * 2**30)
    with pytest.raises(ParamError) as err:
        check_kernel_fits(40_000, 1, planned_kernel_peak_bytes(40_000, 1, 10_000, 2048, 2835), 20 * 2**30)
    message = str(err.value)
    assert message.startswith("jacobian.projection: exact: the 40000×40000 kernel") and "\n" not in message
    assert "use jacobian.projection: khatri_rao with jacobian.dims_per_tensor: 8000" in message


# ---- the ntk stage: exact against none -----------------------------------------------------------

TINY = {
    "data": {"source": "sklearn_digits", "classes": [3, 8], "max_train": 60, "label_noise": 0.1},
    "model": {"hidden": [32]},
    "jacobian": {"batch_size": 16, "shard_rows": 25},  # several shards per split
    "training": {"lr": 0.05, "t": 300},
}


def stage(name: str, project: Path) -> None:
    from pipeline_project import env_for

    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=project,
        env={**env_for(project), "SUI_TRACKING": "off"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_ntk_stage_basis_from_exact_equals_the_one_from_none(tmp_path):
    """The same tiny project with jacobian.projection none, then exact: the ntk stage's bases agree (to the
    float32 the shards store), and so do the loo stage's forms; the exact basis keeps W, which equals
    val_rows_from_cross of the none Jacobians."""
    from pipeline_project import make_project

    from sui_core.linearized.jacobians import load_split

    project = make_project(tmp_path / "project", TINY)
    for name in ("prepare", "model"):
        stage(name, project)
    results = {}
    for projection in ("none", "exact"):
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["jacobian"]["projection"] = projection
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        for name in ("jacobians", "ntk", "loo"):
            stage(name, project)
        keep = tmp_path / projection
        shutil.copytree(project / "data", keep)
        results[projection] = Basis.load(keep / "ntk/basis.npz"), pq.read_table(keep / "loo/forms.parquet")
    (none, none_forms), (exact, exact_forms) = results["none"], results["exact"]
    assert none.space == exact.space == "kernel" and none.val_rows is None
    assert (exact.rank, exact.n_val, exact.dim) == (none.rank, none.n_val, none.dim)
    np.testing.assert_allclose(exact.s, none.s, rtol=1e-5, atol=1e-6 * none.s[0])
    signs = np.sign(np.einsum("nkr,nkr->r", exact.z, none.z))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(exact.z * signs, none.z, atol=1e-5 * np.abs(none.z).max())
    gram = none.gram_val * np.outer(signs, signs)
    np.testing.assert_allclose(exact.gram_val, gram, atol=1e-5 * np.abs(gram).max())
    phi, phi_val = (load_split(tmp_path / "none/jacobians", split)[2] for split in ("train", "val"))
    cross = phi_val.reshape(-1, phi.shape[2]).astype(np.float64) @ phi.reshape(-1, phi.shape[2]).T.astype(np.float64)
    w = val_rows_from_cross(cross, none.z, none.s)
    np.testing.assert_allclose(exact.val_rows * signs, w, atol=1e-5 * np.abs(w).max())
    assert exact_forms.column_names == none_forms.column_names
    for name in none_forms.column_names:
        a, b = exact_forms.column(name).to_numpy(), none_forms.column(name).to_numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9 * np.abs(b).max(), err_msg=name)
