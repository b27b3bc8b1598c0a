"""Z on disk (sui_core.linearized.rows): the leave-one-out solve from a RowFile against retraining the
linear model from scratch, and the file against numpy's own .npy reader."""

import numpy as np
import pytest

from sui_core.linearized import rows
from sui_core.linearized.ntk import build_basis
from sui_core.linearized.reference import brute_force_deltas, trained_weights
from sui_core.linearized.rows import RowFile
from sui_core.linearized.scores import loo_quadratic_forms
from sui_core.linearized.solver import Recipe


def test_row_file_reads_and_writes_what_numpy_does(tmp_path):
    data = np.random.default_rng(0).normal(size=(37, 2, 5))
    z = RowFile.create(tmp_path / "z.npy", data.shape)
    for lo in range(0, 37, 8):
        z[lo : lo + 8] = data[lo : lo + 8]
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), data)
    again = RowFile.open(tmp_path / "z.npy")
    assert again.shape == data.shape and len(again) == 37
    np.testing.assert_array_equal(again[3:30], data[3:30])
    np.testing.assert_array_equal(again[30:99], data[30:])
    with pytest.raises(TypeError, match="contiguous row slices"):
        again[::2]


@pytest.mark.parametrize("k, weight_decay", [(1, 0.0), (3, 0.05)])
def test_loo_from_z_on_disk_equals_retraining_the_linear_model(tmp_path, monkeypatch, k, weight_decay):
    monkeypatch.setattr(rows, "BLOCK_ROWS", 7)  # several blocks in every reduction over all samples
    rng = np.random.default_rng(1)
    n, dim = 60, 12  # D ≤ nk: primal space
    phi = rng.normal(size=(n, k, dim)) / np.sqrt(dim)
    phi_val = rng.normal(size=(9, k, dim)) / np.sqrt(dim)
    residual = rng.normal(size=(n, k))
    recipe = Recipe(lr=0.5, weight_decay=weight_decay, t=200, dynamics="discrete")

    def chunks(a):
        return lambda: (a[lo : lo + 16] for lo in range(0, len(a), 16))

    basis = build_basis(chunks(phi), chunks(phi_val), n, k, dim, z_path=tmp_path / "z.npy")
    assert isinstance(basis.z, RowFile)
    result = loo_quadratic_forms(basis, residual, recipe, batch_size=None, block_size=5, progress=False)

    dw = brute_force_deltas(phi, residual, recipe.full(n), recipe.left_out(n), range(n))
    dval = np.einsum("vkd,id->ivk", phi_val, dw)
    np.testing.assert_allclose(result.forms["dv_sq"], (dw**2).sum(1), rtol=1e-8)
    np.testing.assert_allclose(result.forms["fsi_sum"], (dval**2).sum((1, 2)), rtol=1e-8)
    # the fit, from the two reductions over all samples: y − f(x_i) and y − f₋ᵢ(x_i) of the retrained models
    v = trained_weights(phi, residual, recipe.full(n))
    train_error = residual - phi @ v
    np.testing.assert_allclose(result.fit["train_loss"], 0.5 * (train_error**2).sum(1), rtol=1e-8)
    loo_error = train_error + np.einsum("ikd,id->ik", phi, dw)
    np.testing.assert_allclose(result.loo_error, loo_error, rtol=1e-8, atol=1e-12)
