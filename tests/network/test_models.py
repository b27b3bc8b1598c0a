import json

import numpy as np
import pytest
import torch

from sui_core.config import JacobianConfig, ModelConfig, load_section
from sui_core.errors import ArtifactError, ParamError
from sui_core.linearized.jacobians import jacobian_shapes, make_projector, per_sample_jacobians
from sui_core.network.models import build_model, load_model, save_model
from sui_core.network.outputs import num_outputs, targets

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
    expected = (
        (1 * 16 * 32 + 32)
        + (32 * 16 * 32 + 32)
        + (32 * 9 * 64 + 64)
        + (64 * 9 * 256 + 256)
        + (256 * 9 * 256 + 256)
        + (256 * 10 + 10)
    )
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


def test_saved_model_bytes_depend_only_on_the_weights(tmp_path):
    """Same weights, same model.pt bytes, wherever and whenever saved (the DVC output hash across runs)."""
    for name in ("one", "two"):
        save_model(tmp_path / name, build_model(MLP, (12,), 2), {})
    assert (tmp_path / "one/model.pt").read_bytes() == (tmp_path / "two/model.pt").read_bytes()


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


# --- torchvision architectures (resnet18 on 32x32 keeps these fast) ---------------------------------

RESNET = ModelConfig(arch="resnet18", init_seed=3)


@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_by_name(k, channels):
    model = build_model(RESNET, (channels, 32, 32), k)
    x = torch.rand(2, channels, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, k) and out.dtype == torch.float32 and not model.training
    assert model.fc.out_features == k and model.conv1.weight.shape == (64, 3, 7, 7)
    assert model.spec["hidden"] is None and model.spec["input_shape"] == [channels, 32, 32]
    if channels == 1:  # the gray channel is repeated: the same as the RGB image with three equal planes
        with torch.no_grad():
            assert torch.allclose(out, model(x.expand(2, 3, 32, 32)))


def test_torchvision_bad_arch_and_input():
    for bad in ("resnet19", "fasterrcnn_resnet50_fpn", "ResNet18"):
        with pytest.raises(ParamError, match=r"model.arch: unknown arch .*resnet18, resnet50, densenet121"):
            build_model(ModelConfig(arch=bad), (3, 32, 32), 2)
    with pytest.raises(ParamError, match="model.arch: unknown arch 'resnet19'"):
        load_section({"model": {"arch": "resnet19"}}, "model")
    assert load_section({"model": {"arch": "densenet121"}}, "model").arch == "densenet121"
    with pytest.raises(ParamError, match=r"model.arch: resnet18 needs image inputs .*C = 1 or 3.*\[2, 32, 32\]"):
        build_model(RESNET, (2, 32, 32), 2)
    with pytest.raises(ParamError, match="model.arch: resnet18 needs image inputs"):
        build_model(RESNET, (784,), 2)


def test_torchvision_init_path_and_pretrained_body(tmp_path):
    source = build_model(ModelConfig(arch="resnet18", init_seed=99), (3, 32, 32), 10)
    source.bn1.running_mean.normal_()  # non-default buffers must travel too
    file = tmp_path / "imagenet_like.pt"
    torch.save(source.state_dict(), file)
    assert _same(build_model(ModelConfig(arch="resnet18", init_path=str(file)), (3, 32, 32), 10), source)

    # new head on a pretrained body: k = 1 outputs, the file's 10-output fc is ignored
    cfg = ModelConfig(arch="resnet18", init_seed=7, init_path=str(file), pretrained_body=True)
    model = build_model(cfg, (1, 32, 32), 1)
    fresh = build_model(ModelConfig(arch="resnet18", init_seed=7), (1, 32, 32), 1).state_dict()
    own, src = model.state_dict(), source.state_dict()
    assert [k for k in own if not k.startswith("fc.")] == [k for k in src if not k.startswith("fc.")]
    assert all(torch.equal(own[k], src[k]) for k in own if not k.startswith("fc."))
    assert own["fc.weight"].shape == (1, 512)
    assert torch.equal(own["fc.weight"], fresh["fc.weight"]) and torch.equal(own["fc.bias"], fresh["fc.bias"])
    other = build_model(
        ModelConfig(arch="resnet18", init_seed=8, init_path=str(file), pretrained_body=True), (1, 32, 32), 1
    )
    assert not torch.equal(other.fc.weight, model.fc.weight)  # the head is seeded by init_seed

    # a body file without any head loads too; mismatches name the tensor
    state = {k: v for k, v in src.items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "body.pt")
    build_model(ModelConfig(arch="resnet18", init_path=str(tmp_path / "body.pt"), pretrained_body=True), (3, 32, 32), 1)
    with pytest.raises(ParamError, match=r"model.init_path: .*body.pt: state_dict keys .*missing \['fc.weight'"):
        build_model(ModelConfig(arch="resnet18", init_path=str(tmp_path / "body.pt")), (3, 32, 32), 10)
    bad = dict(state, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(
        ParamError,
        match=r"bad.pt: tensor layer1.0.conv1.weight has shape \[64, 64, 1, 1\], "
        r"the model needs \[64, 64, 3, 3\]",
    ):
        build_model(
            ModelConfig(arch="resnet18", init_path=str(tmp_path / "bad.pt"), pretrained_body=True), (3, 32, 32), 1
        )
    del state["bn1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ParamError, match=r"missing \['bn1.running_var'\], unexpected \['extra.weight'\]"):
        build_model(
            ModelConfig(arch="resnet18", init_path=str(tmp_path / "bad.pt"), pretrained_body=True), (3, 32, 32), 1
        )
    with pytest.raises(ParamError, match="model.pretrained_body: needs model.init_path"):
        load_section({"model": {"arch": "resnet18", "pretrained_body": True}}, "model")

    save_model(tmp_path / "saved", model, {})
    back, info = load_model(tmp_path / "saved")
    assert _same(back, model) and info["arch"] == "resnet18" and info["num_outputs"] == 1
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_batch_norm_eval_jacobians_do_not_depend_on_the_batch():
    """Frozen running statistics: a sample's f0 and Jacobian are the same alone and inside any batch."""
    model = build_model(RESNET, (3, 32, 32), 2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial running statistics
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.rand(3, 3, 32, 32, generator=gen)
    proj = make_projector(JacobianConfig(projection="coordinates", dims_per_tensor=4, seed=1), jacobian_shapes(model))
    model.train()  # per_sample_jacobians must put it back in eval mode
    f0, jac = per_sample_jacobians(model, x)
    f0_alone, jac_alone = per_sample_jacobians(model, x[1:2])
    f0_other, jac_other = per_sample_jacobians(model, torch.cat([x[1:2], 5 * x[2:]]))
    assert not model.training
    phi, phi_alone, phi_other = proj.project(jac), proj.project(jac_alone), proj.project(jac_other)
    assert phi.shape == (3, 2, proj.total_dim) and len(jac) == len(list(model.parameters())) == 62
    torch.testing.assert_close(phi_alone[0], phi[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi_other[0], phi[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f0_alone[0], f0[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(f0, model(x), rtol=1e-5, atol=1e-6)
    model.train()
    with torch.no_grad():
        model(x)  # even a training-mode forward leaves the running statistics of w0 (momentum 0)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers() if not k.endswith("num_batches_tracked"))


def test_freeze():
    model = build_model(ModelConfig(arch="resnet18", freeze=["body"]), (3, 32, 32), 3)
    assert list(jacobian_shapes(model)) == ["fc.weight", "fc.bias"]
    f0, jac = per_sample_jacobians(model, torch.rand(2, 3, 32, 32))
    assert list(jac) == ["fc.weight", "fc.bias"] and jac["fc.weight"].shape == (2, 3, 3, 512)
    mlp = ModelConfig(hidden=[16, 8], freeze=["1", "3.weight"])
    assert list(jacobian_shapes(build_model(mlp, (12,), 2))) == ["3.bias", "5.weight", "5.bias"]
    with pytest.raises(ParamError, match="model.freeze: 'layer9' matches no parameter"):
        build_model(ModelConfig(arch="resnet18", freeze=["layer9"]), (3, 32, 32), 3)
    with pytest.raises(ParamError, match="model.freeze: freezes every parameter"):
        build_model(ModelConfig(hidden=[4], freeze=["1", "3"]), (12,), 2)


def test_freeze_survives_save_load(tmp_path):
    model = build_model(ModelConfig(hidden=[16, 8], freeze=["body"]), (12,), 2)
    assert list(jacobian_shapes(model)) == ["5.weight", "5.bias"]
    save_model(tmp_path, model, {})
    back, info = load_model(tmp_path)
    assert info["freeze"] == ["body"] and list(jacobian_shapes(back)) == ["5.weight", "5.bias"]
