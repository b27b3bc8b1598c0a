"""`sui plan`: what each stage will write to disk and hold in memory, for given params, before running it.

The numbers come from the shapes alone: n (samples per split), the input shape, k (outputs) and D
(the projected parameter count), found without running the pipeline:

- n, the input shape and the classes: from `data/prepared` when it exists and was made from the same
  `data` params (Parquet metadata only: no rows are read); for `npz` from the array headers in the
  file; else the source is loaded (the built-in sources are small: 1797 digits, 5000 MNIST images;
  Fashion-MNIST is 60k + 10k images);
- k = 1 for two classes, else the number of classes (`sui_core.models.num_outputs`);
- D: the model is built on the CPU (seeded init; `init_path` is not read: it cannot change shapes that
  the model stage accepts) and projected with `sui_core.jacobians.make_projector`.

Peak memory reuses the stages' own `planned_peak_bytes` (sui_core.ntk, sui_core.scores). The other
stages' peaks are estimated here from what they hold at once (documented per stage below). The rank r
of the eigenbasis is planned as its upper bound min(n·k, D): directions that are numerically null are
dropped by the ntk stage, so the real Z can only be smaller.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sui_core.config import load_section
from sui_core.errors import DataError, SuiError
from sui_core.scores import FIT, FORMS

PREPARED = Path("data/prepared")
SPLITS = ("train", "val", "test")


@dataclass
class Shapes:
    """What the plan needs to know about the data and the model."""

    n: dict[str, int]  # samples per split
    input_shape: tuple[int, ...]
    num_classes: int
    k: int  # outputs
    param_count: int  # P, weights of the network
    state_count: int  # values in its state_dict (P and buffers such as batch-norm statistics)
    jacobian_count: int  # weights the Jacobian is taken against (P less the frozen ones)
    dim: int  # D, projected parameter count
    source: str  # where n came from: "prepared", "npz headers", or "source"

    @property
    def features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def rank(self) -> int:
        return min(self.n["train"] * self.k, self.dim)


@dataclass
class StagePlan:
    stage: str
    disk_bytes: int  # what the stage's output folder holds
    peak_bytes: int  # the most the stage holds in memory at once
    lower: str  # the params that shrink this stage, for the refusal message
    detail: str  # how the numbers were obtained


@dataclass
class Plan:
    shapes: Shapes
    stages: list[StagePlan]

    @property
    def disk_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.stages)

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak_bytes)


# ---- shapes --------------------------------------------------------------------------------------

def _prepared_shapes(cfg: Any, prepared: Path) -> tuple[dict[str, int], tuple, int] | None:
    """n per split, input shape, classes of `prepared` if it exists and was made from the data config
    `cfg` (compared with defaults filled in, so params added since it was made do not count)."""
    import pyarrow.parquet as pq

    try:
        meta = json.loads((prepared / "meta.json").read_text())
        if load_section({"data": meta["params"]["data"]}, "data") != cfg:
            return None
        n, shape, classes = {}, None, None
        for split in SPLITS:
            md = pq.read_metadata(prepared / f"{split}.parquet")
            n[split] = md.num_rows
            kv = md.metadata or {}
            shape = tuple(json.loads(kv[b"sui.input_shape"]))
            classes = int(kv[b"sui.num_classes"])
        return n, shape, classes
    except (OSError, ValueError, KeyError, TypeError, SuiError):
        return None  # missing, partial or foreign: fall back to the source


def _npz_header(path: Path, name: str, archive: zipfile.ZipFile) -> tuple[tuple[int, ...], np.dtype] | None:
    member = f"{name}.npy"
    if member not in archive.namelist():
        return None
    with archive.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return shape, dtype


def _npz_shapes(cfg) -> tuple[dict[str, int], tuple, int]:
    """n per split and the input shape from the array headers of the npz (labels read: they are small)."""
    path = Path(str(cfg.npz_path))
    if not path.is_file():
        raise DataError(f"{path}: npz file not found (data.npz_path)")
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {name: _npz_header(path, name, archive)
                       for name in ("X_train", "X_val", "X_test")}
        with np.load(path, allow_pickle=False) as z:
            labels = [z[f"y_{s}"] for s in SPLITS if f"y_{s}" in z.files]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable .npz file ({exc})") from exc
    if headers["X_train"] is None or headers["X_val"] is None:
        raise DataError(f"{path}: missing arrays X_train or X_val")
    n = {s: (headers[f"X_{s}"][0][0] if headers[f"X_{s}"] else 0) for s in SPLITS}
    feature = tuple(headers["X_train"][0][1:])
    shape = (1, *feature) if len(feature) == 2 else feature
    classes = len(cfg.classes) if cfg.classes is not None else len(set(np.concatenate(labels).tolist()))
    return n, shape, classes


def data_shapes(params: dict[str, Any], prepared: str | Path = PREPARED) -> tuple[dict[str, int], tuple, int, str]:
    """(n per split, input shape, number of classes, where they came from) for the `data` params."""
    cfg = load_section(params, "data")
    found = _prepared_shapes(cfg, Path(prepared))
    if found is not None:
        return (*found, "prepared")
    if cfg.source == "npz":
        return (*_npz_shapes(cfg), "npz headers")
    from sui_core.data import load_source

    raw = load_source(cfg)
    return ({s: len(split) for s, split in raw.splits.items()}, tuple(raw.train.input_shape),
            raw.train.num_classes, "source")


def shapes(params: dict[str, Any], prepared: str | Path = PREPARED) -> Shapes:
    import torch

    from sui_core.jacobians import make_projector
    from sui_core.models import build_model, num_outputs

    n, input_shape, num_classes, where = data_shapes(params, prepared)
    k = num_outputs(num_classes)
    model_cfg = dataclasses.replace(load_section(params, "model"), init_path=None)
    try:  # on the meta device: shapes without memory (a resnet50 is built in no time)
        with torch.device("meta"):
            model = build_model(model_cfg, input_shape, k)
    except SuiError:
        raise
    except Exception:  # an architecture that needs real tensors to be built: the CPU, once
        model = build_model(model_cfg, input_shape, k)
    try:
        from sui_core.jacobians import jacobian_shapes  # without frozen parameters
        named = jacobian_shapes(model)
    except ImportError:
        named = {name: p.shape for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        projector = make_projector(load_section(params, "jacobian"), named)
    return Shapes(n=n, input_shape=tuple(input_shape), num_classes=num_classes, k=k,
                  param_count=sum(p.numel() for p in model.parameters()),
                  state_count=sum(t.numel() for t in model.state_dict().values()),
                  jacobian_count=sum(math.prod(shape) for shape in named.values()),
                  dim=projector.total_dim, source=where)


# ---- sizes ---------------------------------------------------------------------------------------

def jacobian_shard_bytes(rows: int, k: int, dim: int) -> int:
    """Raw bytes of `rows` shard rows: sample_id int64, f0 k float64, phi k·D float32 (no compression)."""
    return rows * (8 + 8 * k + 4 * k * dim)


def z_bytes(n: int, k: int, r: int) -> int:
    """Z (n, k, r) float64: the training rows in the eigenbasis."""
    return 8 * n * k * r


def make_plan(params: dict[str, Any], prepared: str | Path = PREPARED) -> Plan:
    from sui_core import ntk, scores

    sh = shapes(params, prepared)
    jac = load_section(params, "jacobian")
    loo = load_section(params, "loo")
    n_all = sum(sh.n.values())
    n, n_val, k, dim, r, p = sh.n["train"], sh.n["val"], sh.k, sh.dim, sh.rank, sh.param_count
    inputs = n_all * sh.features * 4
    stages = [
        # disk: float32 inputs + 5 small columns; memory: the source as float64, as float32, and Arrow's copy
        StagePlan("prepare", inputs + 40 * n_all, 4 * inputs, "data.max_train",
                  f"{n_all} samples × {sh.features} float32 inputs"),
        # the state_dict in float32, and the model beside it
        StagePlan("model", 4 * sh.state_count, 2 * 4 * sh.state_count, "model.hidden or model.arch",
                  f"{p} parameters × 4 bytes"),
        # one shard of Φ in numpy and as an Arrow table, plus one batch of full per-sample Jacobians
        # (batch_size × k × P float32) and its projection; the inputs of one split
        StagePlan("jacobians", jacobian_shard_bytes(n + n_val, k, dim),
                  2 * jacobian_shard_bytes(min(jac.shard_rows, max(n, n_val)), k, dim)
                  + 4 * min(jac.batch_size, max(n, 1)) * k * (sh.jacobian_count + dim) + (n + n_val) * sh.features * 4 + 8 * p,
                  "jacobian.shard_rows or jacobian.batch_size",
                  f"{n + n_val} rows × (k·D = {k}·{dim} float32 + f0)"),
        # basis.npz: Z, s, the r×r validation Gram; residual.npz: sample ids and Y − f0
        StagePlan("ntk", z_bytes(n, k, r) + 8 * (r + r * r) + 8 * (n + n * k),
                  ntk.planned_peak_bytes(n, k, dim, min(jac.shard_rows, max(n, 1))),
                  "jacobian.dims_per_tensor or data.max_train",
                  f"Z {n}·{k}·r={r} float64 + r×r ({ntk.choose_space(n, k, dim)} space)"),
        # forms.parquet: sample_id + 4 float64 forms + 3 fit columns; the basis is loaded whole
        StagePlan("loo", 8 * n * (1 + len(FORMS) + len(FIT)),
                  scores.planned_peak_bytes(n, k, r, loo.block_size) + 8 * (r * r + n * k),
                  "loo.block_size or data.max_train", f"{n} × ({len(FORMS)} forms + {len(FIT)} fit)"),
    ]
    return Plan(sh, stages)


# ---- the check and the table ---------------------------------------------------------------------

def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with mlflow
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def free_disk(path: str | Path = ".") -> int:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return int(shutil.disk_usage(path).free)


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # pragma: no cover


def check(plan: Plan, memory: int, disk: int) -> None:
    """SuiError (one line) when the largest peak does not fit in `memory` or the outputs in `disk`."""
    peak = plan.peak
    if peak.peak_bytes > memory:
        raise SuiError(f"plan: stage {peak.stage} needs {human(peak.peak_bytes)} of memory at its peak, "
                       f"{human(memory)} available; lower {peak.lower}")
    if plan.disk_bytes > disk:
        biggest = max(plan.stages, key=lambda s: s.disk_bytes)
        raise SuiError(f"plan: the outputs need {human(plan.disk_bytes)} on disk (stage {biggest.stage}: "
                       f"{human(biggest.disk_bytes)}), {human(disk)} free; lower {biggest.lower}")


def table(plan: Plan, memory: int, disk: int) -> str:
    sh = plan.shapes
    lines = [f"n = {sh.n['train']} train / {sh.n['val']} val / {sh.n['test']} test (from {sh.source}), "
             f"input {list(sh.input_shape)}, k = {sh.k}, P = {sh.param_count} parameters, D = {sh.dim}, "
             f"r ≤ {sh.rank}",
             f"{'stage':<10} {'disk':>12} {'peak memory':>12}  what (disk: uncompressed, an upper bound)",
             ]
    for s in plan.stages:
        lines.append(f"{s.stage:<10} {human(s.disk_bytes):>12} {human(s.peak_bytes):>12}  {s.detail}")
    lines.append(f"{'total':<10} {human(plan.disk_bytes):>12} {human(plan.peak.peak_bytes):>12}  "
                 f"(largest peak: {plan.peak.stage})")
    lines.append(f"available: {human(memory)} memory, {human(disk)} disk free: fits")
    return "\n".join(lines)

