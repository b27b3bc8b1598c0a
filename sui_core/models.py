"""The network at w0 (the linearization point), its regression targets, and its saved form.

The model is built under a forked RNG seeded by `init_seed`, so w0 depends on that seed alone and
building a model never shifts the random stream of the caller.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from sui_core.config import ModelConfig
from sui_core.errors import ArtifactError, DataError, ParamError, SuiError
from sui_core.io import atomic_path, file_sha256, read_json, write_json

# Spatial side the 4-layer CNN needs: 20 -> 10 (4x4/2) -> 5 (4x4/2) -> 3 (3x3) -> 1 (3x3).
CNN_MIN_SIDE = 20


def num_outputs(num_classes: int) -> int:
    """Two classes need one output (the label in {0, 1}); more need one output per class."""
    if num_classes < 2:
        raise DataError(f"need at least 2 classes, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Regression targets (n, k) float64: the label itself for k = 1, one-hot otherwise."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    if num_outputs(num_classes) == 1:
        return labels[:, None].astype(np.float64)
    return np.eye(num_classes, dtype=np.float64)[labels]


def build_model(cfg: ModelConfig, input_shape, num_outputs: int) -> nn.Module:
    """Build the float32 network in eval mode; w0 is seeded by cfg.init_seed or loaded from cfg.init_path.

    The returned module carries `spec` (arch, hidden, input_shape, num_outputs): what load_model needs
    to rebuild it.
    """
    input_shape = tuple(int(d) for d in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        if cfg.arch == "mlp":
            model = _mlp(list(cfg.hidden), input_shape, num_outputs)
        elif cfg.arch == "cnn":
            model = _cnn(input_shape, num_outputs)
        else:
            raise ParamError("model.arch", f"unknown arch {cfg.arch!r}")
    model = model.float().eval()
    model.spec = {"arch": cfg.arch, "hidden": list(cfg.hidden) if cfg.arch == "mlp" else None,
                  "input_shape": list(input_shape), "num_outputs": num_outputs}
    if cfg.init_path:
        path = Path(cfg.init_path)
        _load_state(model, path, lambda msg: ParamError("model.init_path", f"{path}: {msg}"))
    return model


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
        raise ParamError("model.arch", f"cnn needs inputs (C, H, W) with H, W >= {CNN_MIN_SIDE}, "
                         f"got input_shape {list(input_shape)}; use arch mlp")
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.Conv2d(64, 256, 3), nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        width = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, k))


def _load_state(model: nn.Module, path: Path, error: Callable[[str], SuiError]) -> None:
    """Load a state_dict file into `model`, naming the first missing, unexpected or misshapen tensor."""
    if not path.is_file():
        raise error("file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise error(f"not a readable state_dict file ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error("not a state_dict (a mapping of tensor names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise error(f"state_dict keys do not match the model: missing {missing}, unexpected {unexpected}")
    for name, tensor in own.items():
        if state[name].shape != tensor.shape:
            raise error(f"tensor {name} has shape {list(state[name].shape)}, the model needs {list(tensor.shape)}")
    model.load_state_dict(state)


def save_model(dir: str | Path, model: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """Write model.pt, then model.json with its sha256 (each atomically); return the model.json content.

    model.json is written last and records the hash, so a model.pt left from an interrupted save is
    caught by load_model rather than trusted.
    """
    dir = Path(dir)
    with atomic_path(dir / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    record = {**info, **model.spec, "param_count": sum(p.numel() for p in model.parameters()),
              "sha256": file_sha256(dir / "model.pt")}
    write_json(dir / "model.json", record)
    return record


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
        cfg = ModelConfig(arch=info["arch"], hidden=info["hidden"] or [])
        model = build_model(cfg, info["input_shape"], info["num_outputs"])
    except (KeyError, TypeError, ParamError) as exc:
        raise ArtifactError(f"{dir / 'model.json'}: invalid model description ({exc!r})") from exc
    _load_state(model, path, lambda msg: ArtifactError(f"{path}: {msg}"))
    return model, info
