import json

import numpy as np
import pytest
import torch

from sui_core.config import ModelConfig
from sui_core.errors import ArtifactError, ParamError
from sui_core.models import build_model, load_model, num_outputs, save_model, targets

MLP = ModelConfig(arch="mlp", hidden=[16, 8], init_seed=3)
CNN = ModelConfig(arch="cnn", init_seed=3)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cfg, shape", [(MLP, (1, 8, 8)), (MLP, (12,)), (CNN, (1, 28, 28)), (CNN, (3, 20, 24))])
@pytest.mark.parametrize("k", [1, 10])
def test_output_shapes(cfg, shape, k):
    model = build_model(cfg, shape, k)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, k) and out.dtype == torch.float32 and not model.training


def test_mlp_layers():
    model = build_model(MLP, (1, 8, 8), 3)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 8), (8, 3)]


def test_cnn_param_count():
    """Conv and linear sizes of the paper's CNN on 28x28: 28 -> 14 -> 7 -> 5 -> 3, flatten 256*3*3."""
    model = build_model(CNN, (1, 28, 28), 10)
    expected = (1 * 16 * 32 + 32) + (32 * 16 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 256 + 256) \
        + (256 * 9 * 256 + 256) + (256 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_seeding():
    assert _same(build_model(MLP, (12,), 2), build_model(MLP, (12,), 2))
    assert not _same(build_model(MLP, (12,), 2), build_model(ModelConfig(hidden=[16, 8], init_seed=4), (12,), 2))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model(CNN, (1, 28, 28), 1)
    assert torch.equal(torch.rand(3), expected), "building a model must not move the global RNG"


def test_cnn_too_small():
    with pytest.raises(ParamError, match=r"model.arch: cnn needs .* >= 20.*\[1, 8, 8\]"):
        build_model(CNN, (1, 8, 8), 10)
    with pytest.raises(ParamError, match="model.arch"):
        build_model(CNN, (1, 19, 28), 10)
    with pytest.raises(ParamError, match="model.arch"):
        build_model(CNN, (784,), 10)


def test_init_path(tmp_path):
    source = build_model(ModelConfig(hidden=[16, 8], init_seed=99), (12,), 3)
    torch.save(source.state_dict(), tmp_path / "w0.pt")
    loaded = build_model(ModelConfig(hidden=[16, 8], init_path=str(tmp_path / "w0.pt")), (12,), 3)
    assert _same(loaded, source)

    with pytest.raises(ParamError, match=r"model.init_path: .*w0.pt: tensor 3.weight has shape \[8, 16\]"):
        build_model(ModelConfig(hidden=[16, 4], init_path=str(tmp_path / "w0.pt")), (12,), 3)
    with pytest.raises(ParamError, match=r"missing \['7.weight', '7.bias'\]"):
        build_model(ModelConfig(hidden=[16, 8, 8], init_path=str(tmp_path / "w0.pt")), (12,), 3)
    with pytest.raises(ParamError, match="absent.pt: file not found"):
        build_model(ModelConfig(init_path=str(tmp_path / "absent.pt")), (12,), 3)


@pytest.mark.parametrize("cfg, shape", [(MLP, (1, 8, 8)), (CNN, (1, 28, 28))])
def test_save_load_round_trip(tmp_path, cfg, shape):
    model = build_model(cfg, shape, 10)
    save_model(tmp_path, model, {"init_seed": cfg.init_seed})
    back, info = load_model(tmp_path)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert info["init_seed"] == 3 and info["input_shape"] == list(shape) and info["num_outputs"] == 10
    assert info["param_count"] == sum(p.numel() for p in model.parameters())
    assert json.loads((tmp_path / "model.json").read_text()) == info


def test_load_model_errors(tmp_path):
    with pytest.raises(ArtifactError, match="model.json: file not found"):
        load_model(tmp_path)
    model = build_model(MLP, (12,), 2)
    save_model(tmp_path, model, {})
    torch.save(build_model(ModelConfig(hidden=[16, 8], init_seed=5), (12,), 2).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ArtifactError, match="model.pt: sha256 does not match"):
        load_model(tmp_path)
    (tmp_path / "model.pt").unlink()
    with pytest.raises(ArtifactError, match="model.pt: file not found"):
        load_model(tmp_path)


def test_num_outputs_and_targets():
    assert [num_outputs(c) for c in (2, 3, 10)] == [1, 3, 10]
    labels = np.array([0, 1, 1, 0])
    np.testing.assert_array_equal(targets(labels, 2), labels[:, None].astype(float))
    labels = np.array([2, 0, 1, 2])
    onehot = targets(labels, 3)
    assert onehot.dtype == np.float64 and onehot.shape == (4, 3)
    np.testing.assert_array_equal(onehot.argmax(1), labels)
    np.testing.assert_array_equal(onehot.sum(1), 1.0)
