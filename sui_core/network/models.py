"""The network at w0 (the linearization point) and its saved form (its regression targets:
`sui_core.network.outputs`).

The model is built under a forked RNG seeded by `init_seed`, so w0 depends on that seed alone and
building a model never shifts the random stream of the caller.

Architectures: `mlp`, `cnn` (the paper's), or any name of `torchvision.models.list_models(module=
torchvision.models)`, built with `weights=None` (nothing is ever downloaded) and `num_classes = k`.
A 1-channel input is repeated to 3 channels by a forward pre-hook on the network, so its state_dict
keeps torchvision's names and shapes and an RGB-pretrained file loads as is (this equals a first conv
whose kernel is the sum of the RGB kernels).

Batch norm: the network is always used in eval mode (normalization by the running statistics, which
are never updated: every batch-norm layer also gets momentum 0, the paper's "disable the exponential
averaging of batch statistics"). That is the deterministic function of one sample the linearization
needs: a sample's output and Jacobian do not depend on the rest of its batch.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sui_core.config import ModelConfig
from sui_core.errors import ArtifactError, ParamError, SuiError
from sui_core.io import atomic_path, file_sha256, read_json, write_json

# Spatial side the 4-layer CNN needs: 20 -> 10 (4x4/2) -> 5 (4x4/2) -> 3 (3x3) -> 1 (3x3).
CNN_MIN_SIDE = 20


def build_model(cfg: ModelConfig, input_shape, num_outputs: int) -> nn.Module:
    """Build the float32 network in eval mode; w0 is seeded by cfg.init_seed or loaded from cfg.init_path.

    With cfg.pretrained_body the file is loaded into everything but the classifier head (`head_names`),
    which keeps its seeded init with `num_outputs` outputs. Parameters matched by cfg.freeze get
    requires_grad False: they are constants of the linearization (no Jacobian columns).
    The returned module carries `spec` (arch, hidden, input_shape, num_outputs, freeze): what load_model
    needs to rebuild it.
    """
    input_shape = tuple(int(d) for d in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = _build(cfg.arch, list(cfg.hidden), input_shape, num_outputs)
    model = model.float().eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # running statistics stay those of w0 even if train() is called
    model.spec = {
        "arch": cfg.arch,
        "hidden": list(cfg.hidden) if cfg.arch == "mlp" else None,
        "input_shape": list(input_shape),
        "num_outputs": num_outputs,
        "freeze": list(cfg.freeze),
    }
    needs_head = cfg.pretrained_body or "body" in cfg.freeze
    head = head_names(cfg.arch, list(cfg.hidden), input_shape, num_outputs) if needs_head else []
    if cfg.init_path:
        path = Path(cfg.init_path)
        _load_state(
            model,
            path,
            lambda msg: ParamError("model.init_path", f"{path}: {msg}"),
            skip=head if cfg.pretrained_body else (),
        )
    _freeze(model, cfg.freeze, head)
    return model


def torchvision_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    """ParamError unless `arch` is mlp, cnn or a torchvision.models classification architecture."""
    if arch in ("mlp", "cnn"):
        return
    if arch not in torchvision_archs():
        raise ParamError(
            "model.arch",
            f"unknown arch {arch!r} (choose mlp, cnn or a torchvision.models name, "
            f"e.g. resnet18, resnet50, densenet121, mobilenet_v3_small, vgg11_bn, vit_b_16; "
            f"all: torchvision.models.list_models(module=torchvision.models))",
        )


def _build(arch: str, hidden: list[int], input_shape: tuple[int, ...], k: int) -> nn.Module:
    if arch == "mlp":
        return _mlp(hidden, input_shape, k)
    if arch == "cnn":
        return _cnn(input_shape, k)
    return _torchvision(arch, input_shape, k)


def head_names(arch: str, hidden: list[int], input_shape: tuple[int, ...], k: int) -> list[str]:
    """State_dict names of the classifier head: the tensors whose shape depends on the number of outputs.

    Found by building the architecture for k and k + 1 outputs (on the meta device: no memory, no RNG)
    and comparing shapes, so it holds for every architecture (resnet `fc`, densenet `classifier`, vgg
    `classifier.6`, the mlp's last Linear, ...).
    """

    def shapes(n: int) -> dict[str, torch.Size]:
        try:
            with torch.device("meta"):
                return {name: t.shape for name, t in _build(arch, hidden, input_shape, n).state_dict().items()}
        except (NotImplementedError, RuntimeError):  # an init that copies data (regnet): build on the CPU
            with torch.random.fork_rng(devices=[]):
                return {name: t.shape for name, t in _build(arch, hidden, input_shape, n).state_dict().items()}

    a, b = shapes(k), shapes(k + 1)
    return [name for name in a if a[name] != b.get(name)]


def _gray_to_rgb(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: repeat a 1-channel image (B, 1, H, W) to the 3 channels the network takes."""
    x = args[0]
    return (x.expand(x.shape[0], 3, *x.shape[2:]), *args[1:])


def _torchvision(name: str, input_shape: tuple[int, ...], k: int) -> nn.Module:
    import torchvision

    check_arch(name)
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ParamError(
            "model.arch", f"{name} needs image inputs (C, H, W) with C = 1 or 3, got input_shape {list(input_shape)}"
        )
    kwargs: dict[str, Any] = {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": True}  # no auxiliary heads (unused in eval mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        net = torchvision.models.get_model(name, weights=None, num_classes=k, **kwargs)
    if input_shape[0] == 1:
        net.register_forward_pre_hook(_gray_to_rgb)
    if next(net.parameters()).device.type != "meta":  # check the input size fits (e.g. vit needs 224)
        net.eval()
        try:
            with torch.no_grad():
                out = net(torch.zeros(1, *input_shape))
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            raise ParamError(
                "model.arch", f"{name} cannot take inputs of shape {list(input_shape)} ({str(exc).splitlines()[0]})"
            ) from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, k):
            raise ParamError("model.arch", f"{name} does not give {k} outputs per sample")
    return net


def _freeze(model: nn.Module, prefixes: Iterable[str], head: list[str]) -> None:
    """requires_grad False on the parameters under each prefix (module path or tensor name; `body`: all
    but the head); ParamError for a prefix that matches nothing or a freeze that leaves nothing."""
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    for prefix in prefixes:
        if prefix == "body":
            hit = [n for n in names if n not in head]
        else:
            hit = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hit:
            raise ParamError(
                "model.freeze",
                f"{prefix!r} matches no parameter (names are like "
                f"{', '.join(names[:3])}, …, {names[-1]}; or use 'body')",
            )
        frozen.update(hit)
    if frozen and frozen == set(names):
        raise ParamError("model.freeze", "freezes every parameter: nothing left to linearize")
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)


def _mlp(hidden: list[int], input_shape: tuple[int, ...], k: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(np.prod(input_shape))
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, k))


def _cnn(input_shape: tuple[int, ...], k: int) -> nn.Module:
    """The paper's 4-layer CNN; the flatten width comes from a forward pass on a zero input."""
    if len(input_shape) != 3 or min(input_shape[1:]) < CNN_MIN_SIDE:
        raise ParamError(
            "model.arch",
            f"cnn needs inputs (C, H, W) with H, W >= {CNN_MIN_SIDE}, "
            f"got input_shape {list(input_shape)}; use arch mlp",
        )
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.Conv2d(64, 256, 3),
        nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        width = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, k))


def _names(names: list[str], limit: int = 6) -> str:
    return str(names) if len(names) <= limit else f"{names[:limit]} … ({len(names)} in all)"


def _load_state(model: nn.Module, path: Path, error: Callable[[str], SuiError], skip: Iterable[str] = ()) -> None:
    """Load a state_dict file into `model`, naming the first missing, unexpected or misshapen tensor.

    Tensors named in `skip` (the head, for a pretrained body) keep the model's values: the file may hold
    them with any shape, or not at all.
    """
    if not path.is_file():
        raise error("file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise error(f"not a readable state_dict file ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error("not a state_dict (a mapping of tensor names to tensors)")
    skip = set(skip)
    state = {k: v for k, v in state.items() if k not in skip}
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in skip]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise error(
            f"state_dict keys do not match the model: missing {_names(missing)}, unexpected {_names(unexpected)}"
        )
    for name, tensor in own.items():
        if name in state and state[name].shape != tensor.shape:
            raise error(f"tensor {name} has shape {list(state[name].shape)}, the model needs {list(tensor.shape)}")
    model.load_state_dict(state, strict=not skip)


def save_model(dir: str | Path, model: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """Write model.pt, then model.json with its sha256 (each atomically); return the model.json content.

    model.json is written last and records the hash, so a model.pt left from an interrupted save is
    caught by load_model rather than trusted.
    """
    dir = Path(dir)
    with atomic_path(dir / "model.pt") as tmp, open(tmp, "wb") as fh:
        torch.save(model.state_dict(), fh)  # to a file object: a path would put its random name in the archive
    record = {
        **info,
        **model.spec,
        "param_count": sum(p.numel() for p in model.parameters()),
        "sha256": file_sha256(dir / "model.pt"),
    }
    write_json(dir / "model.json", record)
    return record


def architecture(info: dict[str, Any]) -> ModelConfig:
    """The architecture a model.json describes (arch, hidden, freeze), as a config whose init can change."""
    return ModelConfig(arch=info["arch"], hidden=info["hidden"] or [], freeze=info.get("freeze") or [])


def load_model(dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from model.json and load model.pt after checking its sha256."""
    dir = Path(dir)
    info = read_json(dir / "model.json")
    path = dir / "model.pt"
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run the model stage first)")
    if file_sha256(path) != info.get("sha256"):
        raise ArtifactError(f"{path}: sha256 does not match {dir / 'model.json'} (file changed or partly written)")
    try:
        model = build_model(architecture(info), info["input_shape"], info["num_outputs"])
    except (KeyError, TypeError, ParamError) as exc:
        raise ArtifactError(f"{dir / 'model.json'}: invalid model description ({exc!r})") from exc
    _load_state(model, path, lambda msg: ArtifactError(f"{path}: {msg}"))
    return model, info
