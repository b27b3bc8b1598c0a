"""Robustness of the scores (paper A.4): does F-SI rank the same samples high for another network?

F-SI of the same training data is computed (`sui_core.linearized.estimate.unique_information`) for a base variant
(first architecture, first init seed, first training length) and for three variants that each change
one of them: the second architecture, the second init seed, the second training length (steps t of
the same recipe: lr, weight decay, dynamics). The Spearman rank correlation between every pair of the
four score vectors is the result; the three base-vs-variant entries are the headline numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from sui_core.config import JacobianConfig, ModelConfig
from sui_core.linearized.estimate import unique_information
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model

FACTORS = ("arch", "init", "length")


@dataclass(frozen=True)
class Variant:
    name: str
    arch: str
    init_seed: int
    steps: float


def variants(archs: tuple[str, str], init_seeds: tuple[int, int], steps: tuple[float, float]) -> list[Variant]:
    """The base variant and one per factor changed (arch, init, length), named by what they are."""
    base = Variant(f"{archs[0]} seed {init_seeds[0]} t={steps[0]:g}", archs[0], init_seeds[0], steps[0])
    return [
        base,
        dataclasses.replace(base, name=f"{archs[1]} (arch)", arch=archs[1]),
        dataclasses.replace(base, name=f"seed {init_seeds[1]} (init)", init_seed=init_seeds[1]),
        dataclasses.replace(base, name=f"t={steps[1]:g} (length)", steps=steps[1]),
    ]


def spearman_matrix(scores: list[np.ndarray]) -> np.ndarray:
    """Spearman rank correlation of every pair of score vectors (m, m)."""
    m = len(scores)
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = float(spearmanr(scores[i], scores[j]).statistic)
    return out


def fsi_variants(
    model_cfg: ModelConfig,
    x: torch.Tensor,
    y: np.ndarray,
    x_val: torch.Tensor,
    recipe: Recipe,
    jacobian: JacobianConfig,
    var: list[Variant],
    num_outputs: int,
    progress: bool = True,
) -> list[np.ndarray]:
    """F-SI (n,) of (x, y) for each variant: the network `model_cfg` with the variant's arch and init
    seed (mlp keeps model_cfg.hidden), linearized at its w0, trained by `recipe` for the variant's steps."""
    out = []
    for v in tqdm(var, desc="robustness variants", disable=not progress):
        model = build_model(
            dataclasses.replace(model_cfg, arch=v.arch, init_seed=v.init_seed), x.shape[1:], num_outputs
        )
        est = unique_information(model, x, y, x_val, dataclasses.replace(recipe, t=v.steps), jacobian)
        out.append(est.scores["fsi"])
    return out


def headline(matrix: np.ndarray) -> dict[str, float]:
    """Base-vs-variant correlations: spearman_arch, spearman_init, spearman_length."""
    return {f"spearman_{factor}": float(matrix[0, i + 1]) for i, factor in enumerate(FACTORS)}
