"""Robustness of F-SI (sui_core.studies.robustness): the variants change one factor each, and the rank
correlations match a hand computation."""

import numpy as np
import pytest
import torch

from sui_core.config import JacobianConfig, ModelConfig
from sui_core.linearized.estimate import unique_information
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.studies.robustness import fsi_variants, headline, spearman_matrix, variants


def ranks(v):
    return np.argsort(np.argsort(v)).astype(float)


def test_spearman_matrix_is_pearson_of_ranks():
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    scores = [a, a**3, -a, rng.normal(size=30)]
    m = spearman_matrix(scores)
    assert m[0, 1] == pytest.approx(1.0) and m[0, 2] == pytest.approx(-1.0)
    assert m[0, 3] == pytest.approx(np.corrcoef(ranks(a), ranks(scores[3]))[0, 1])
    np.testing.assert_allclose(m, m.T)
    assert headline(m) == {"spearman_arch": m[0, 1], "spearman_init": m[0, 2], "spearman_length": m[0, 3]}


def test_each_variant_changes_one_factor_and_is_scored_like_a_fresh_estimate():
    var = variants(("mlp", "cnn"), (0, 7), (30, 90))
    assert [(v.arch, v.init_seed, v.steps) for v in var] == [
        ("mlp", 0, 30),
        ("cnn", 0, 30),
        ("mlp", 7, 30),
        ("mlp", 0, 90),
    ]
    gen = torch.Generator().manual_seed(0)
    shape = [1, 20, 20]
    x, x_val = torch.rand(12, *shape, generator=gen), torch.rand(5, *shape, generator=gen)
    y = (np.arange(12) % 2)[:, None].astype(np.float64)
    cfg, jac = ModelConfig(hidden=[16], init_seed=3), JacobianConfig(dims_per_tensor=50)
    recipe = Recipe(0.05, 0.0, 30, "discrete")
    got = fsi_variants(cfg, x, y, x_val, recipe, jac, var, 1, progress=False)
    for v, fsi in zip(var, got):
        model = build_model(ModelConfig(arch=v.arch, hidden=[16], init_seed=v.init_seed), shape, 1)
        want = unique_information(model, x, y, x_val, Recipe(0.05, 0.0, v.steps, "discrete"), jac).scores["fsi"]
        np.testing.assert_allclose(fsi, want, rtol=1e-10)
    assert not np.allclose(got[0], got[2]) and not np.allclose(got[0], got[3])


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"archs": ["mlp", "mlp"]}, "archs"),
        ({"init_seeds": [0]}, "init_seeds"),
        ({"steps": [100, 0]}, "steps"),
        ({"archs": ["mlp", "nonet"]}, "archs"),
    ],
)
def test_bad_params_name_the_key(raw, key):
    from sui_core.config import load_section
    from sui_core.errors import ParamError

    with pytest.raises(ParamError, match=f"robustness.{key}"):
        load_section({"robustness": raw}, "robustness")
