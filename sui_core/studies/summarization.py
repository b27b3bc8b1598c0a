"""Data summarization (paper Fig. 2c): remove part of the training set by a score, retrain the real
network on what is left, and measure test accuracy.

Strategies (each removes round(f·n) of the n training samples for every fraction f):

- `fsi_bottom`: least informative first (lowest F-SI of the full set, computed once);
- `fsi_top`: most informative first;
- `random`: a seeded random order;
- `fsi_bottom_iterative`: remove the round(step·n) lowest-F-SI samples, recompute F-SI on what is left,
  repeat (the last removal before a fraction may be smaller so every fraction is met exactly). The
  linearization point w0 does not change, so the Jacobians Φ of the full set are computed once and
  each re-score is `Linearization.estimate` on the kept rows;
- `el2n`, `grand` (Paul et al. 2021): lowest score removed first (`sui_core.studies.baselines`).

One seed s fixes everything random in a repetition: w0 (the model's init seed is set to s), the random
order (numpy generator seeded by s), and the init seeds the EL2N and GraNd scores average over
(`score_seeds`: 1000·(s + 1) + j, disjoint from w0's seeds below 1000). F-SI is computed for w0 with
the pipeline's recipe, and every retraining is that same recipe (full-batch SGD on the mean loss, lr,
t steps, weight decay towards w0) from the same w0, on the kept rows only: training cost scales with
what is kept (measured faster than stacking 0/1 sample-weight runs over all n; see README).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from sui_core.config import SUMMARIZATION_STRATEGIES as STRATEGIES
from sui_core.config import JacobianConfig, SummarizationConfig
from sui_core.io import atomic_path
from sui_core.linearized.estimate import linearize
from sui_core.linearized.solver import Recipe
from sui_core.network.training import predict, train_full_batch
from sui_core.studies.baselines import Builder, el2n, grand


def removal_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """round(f·n) for each fraction, refusing fractions that would leave no sample."""
    counts = [int(round(f * n)) for f in fractions]
    if any(c < 0 or c >= n for c in counts):
        raise ValueError(f"fractions {list(fractions)} must remove between 0 and n - 1 of the {n} samples")
    return counts


def kept_by_order(order: np.ndarray, count: int) -> np.ndarray:
    """The sorted indices left after removing the first `count` of `order` (removal order)."""
    return np.sort(order[count:])


def iterative_removal(
    rescore: Callable[[np.ndarray], np.ndarray], n: int, counts: Sequence[int], step: int
) -> dict[int, np.ndarray]:
    """Kept indices after removing each count in `counts` by repeated lowest-score removal.

    rescore(kept) gives the scores (len(kept),) of the kept samples among themselves. Each round
    removes the `step` lowest, or fewer when a count in `counts` is closer, then re-scores.
    """
    if step < 1:
        raise ValueError(f"the iterative step must remove at least one sample, got {step}")
    kept = np.arange(n)
    out = {0: kept} if 0 in counts else {}
    stops = sorted(set(c for c in counts if c > 0))
    for stop in stops:
        while n - len(kept) < stop:
            drop = min(step, stop - (n - len(kept)))
            scores = rescore(kept)
            kept = np.sort(kept[np.argsort(scores, kind="stable")[drop:]])
        out[stop] = kept
    return out


def accuracy(outputs: torch.Tensor, labels: np.ndarray) -> float:
    """Share of correct predictions from outputs (len, k): output > 0.5 is class 1 for k = 1, else argmax."""
    out = outputs.detach().to(torch.float64).numpy()
    predicted = (out[:, 0] > 0.5).astype(np.int64) if out.shape[1] == 1 else out.argmax(1)
    return float((predicted == np.asarray(labels)).mean())


def retrained_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    kept: np.ndarray,
    x_test: torch.Tensor,
    test_labels: np.ndarray,
    recipe: Recipe,
) -> float:
    """Test accuracy of `model` (w0) trained by the recipe on the rows `kept` of (x, y) only."""
    idx = torch.as_tensor(kept)
    params = train_full_batch(
        model, x[idx], y[idx], torch.ones(1, len(kept)), recipe.lr, int(recipe.t), recipe.weight_decay
    )
    return accuracy(predict(model, params, x_test)[0], test_labels)


def score_seeds(seed: int, inits: int) -> list[int]:
    return [1000 * (seed + 1) + j for j in range(inits)]


def removal_orders(
    build: Builder,
    seed: int,
    x: torch.Tensor,
    y: np.ndarray,
    x_val: torch.Tensor,
    recipe: Recipe,
    jacobian: JacobianConfig,
    settings: SummarizationConfig,
    counts: Sequence[int],
) -> dict[str, dict[int, np.ndarray]]:
    """For each strategy, the kept indices after each removal count, for w0 = build(seed)."""
    n = len(x)
    strategies = set(settings.strategies)
    orders: dict[str, np.ndarray] = {}
    model = build(seed)
    if strategies & {"fsi_bottom", "fsi_top", "fsi_bottom_iterative"}:
        linearization = linearize(model, x, x_val, jacobian)

        def fsi(kept: np.ndarray) -> np.ndarray:
            return linearization.estimate(y[kept], recipe, kept).scores["fsi"]

        full = fsi(np.arange(n))
        orders["fsi_bottom"] = np.argsort(full, kind="stable")
        orders["fsi_top"] = np.argsort(-full, kind="stable")
    if "random" in strategies:
        orders["random"] = np.random.default_rng(seed).permutation(n)
    seeds = score_seeds(seed, settings.score_inits)
    if "el2n" in strategies:
        orders["el2n"] = np.argsort(
            el2n(build, x, y, seeds, recipe.lr, settings.el2n_steps, recipe.weight_decay), kind="stable"
        )
    if "grand" in strategies:
        orders["grand"] = np.argsort(
            grand(build, x, y, seeds, recipe.lr, settings.grand_steps, recipe.weight_decay, batch_size=64),
            kind="stable",
        )
    kept = {
        name: {c: kept_by_order(orders[name], c) for c in counts}
        for name in settings.strategies
        if name != "fsi_bottom_iterative"
    }
    if "fsi_bottom_iterative" in strategies:
        step = max(1, int(round(settings.iterative_step * n)))
        kept["fsi_bottom_iterative"] = iterative_removal(fsi, n, counts, step)
    return kept


def summarize(
    build: Builder,
    x: torch.Tensor,
    y: np.ndarray,
    x_val: torch.Tensor,
    x_test: torch.Tensor,
    test_labels: np.ndarray,
    recipe: Recipe,
    jacobian: JacobianConfig,
    settings: SummarizationConfig,
    progress: bool = True,
) -> list[dict]:
    """One row {seed, strategy, fraction, removed, kept, accuracy} per seed, strategy and fraction.

    x, x_val, x_test: inputs; y (n, k) regression targets of the training labels; test_labels the
    test split's class indices. Fraction 0 (no removal) is trained once per seed and shared by all
    strategies.
    """
    unknown = sorted(set(settings.strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"unknown strategies {unknown} (known: {', '.join(STRATEGIES)})")
    n = len(x)
    counts = removal_counts(n, settings.fractions)
    y_t = torch.as_tensor(np.asarray(y, dtype=np.float64))
    rows = []
    total = len(settings.seeds) * (len(settings.strategies) * sum(c > 0 for c in counts) + (0 in counts))
    bar = tqdm(total=total, desc="summarization retrainings", disable=not progress)
    for seed in settings.seeds:
        kept = removal_orders(build, seed, x, y, x_val, recipe, jacobian, settings, counts)
        model = build(seed)
        unpruned = None  # accuracy with nothing removed: the same for every strategy
        for name in settings.strategies:
            for fraction, count in zip(settings.fractions, counts):
                if count == 0 and unpruned is not None:
                    acc = unpruned
                else:
                    acc = retrained_accuracy(model, x, y_t, kept[name][count], x_test, test_labels, recipe)
                    bar.update()
                if count == 0:
                    unpruned = acc
                rows.append(
                    {
                        "seed": seed,
                        "strategy": name,
                        "fraction": float(fraction),
                        "removed": count,
                        "kept": n - count,
                        "accuracy": acc,
                    }
                )
    bar.close()
    return rows


def curves(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of the accuracy over seeds, per
    strategy and fraction, in the order of `rows`."""
    groups: dict[tuple[str, float], list[float]] = {}
    for row in rows:
        groups.setdefault((row["strategy"], row["fraction"]), []).append(row["accuracy"])
    return [
        {
            "strategy": s,
            "fraction": f,
            "seeds": len(a),
            "mean": float(np.mean(a)),
            "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
        }
        for (s, f), a in groups.items()
    ]


def accuracy_drops(table: list[dict]) -> dict[str, float]:
    """Points of mean test accuracy lost at each fraction against no removal, per strategy:
    {"<strategy>_drop_at_<pct>pct": 100·(acc(0) − acc(f))}; needs fraction 0 in the table."""
    base = {row["strategy"]: row["mean"] for row in table if row["fraction"] == 0}
    return {
        f"{row['strategy']}_drop_at_{round(row['fraction'] * 100)}pct": 100 * (base[row["strategy"]] - row["mean"])
        for row in table
        if row["fraction"] > 0 and row["strategy"] in base
    }


def write_tables(rows: list[dict], table: list[dict], runs_csv, curves_csv, curves_md) -> None:
    """Every retraining (runs_csv), the mean ± std per strategy and fraction (curves_csv), and the same
    as a markdown table of test accuracy in percent, strategies × fractions removed (curves_md)."""
    for path, records in ((runs_csv, rows), (curves_csv, table)):
        with atomic_path(path) as tmp:
            keys = list(records[0])
            tmp.write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in records]) + "\n")
    fractions = sorted({r["fraction"] for r in table})
    cell = {(r["strategy"], r["fraction"]): f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" for r in table}
    strategies = list(dict.fromkeys(r["strategy"] for r in table))
    lines = [
        "| strategy | " + " | ".join(f"{round(100 * f)} % removed" for f in fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    lines += [f"| {s} | " + " | ".join(cell.get((s, f), "") for f in fractions) + " |" for s in strategies]
    with atomic_path(curves_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
