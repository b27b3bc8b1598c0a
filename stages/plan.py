"""`sui plan`: what each stage will write to disk and hold in memory, for given params, before running it.

Memory comes from the shapes alone: n (samples per split), the input shape, k (outputs) and D (the
projected parameter count), found without running the pipeline:

- n, the input shape and the classes: from `data/prepared` when it exists and was made from the same
  `data` params (Parquet metadata; rows only for the disk sample below); for `npz` from the array headers in the
  file; else the source is loaded (the built-in sources are small: 1797 digits, 5000 MNIST images;
  Fashion-MNIST is 60k + 10k images);
- k = 1 for two classes, else the number of classes (`sui_core.network.outputs.num_outputs`);
- D: the model is built on the CPU (seeded init; `init_path` is not read: it cannot change shapes that
  the model stage accepts) and given the jacobians stage's own store (`sui_core.linearized.factors.make_store`);
  for `jacobian.projection: exact` D is the number of trained parameters, and what a sample stores (its
  layer factors, `sui_core.linearized.factors.factor_layout`) comes from one forward pass of the model
  on the meta device; `khatri_rao` projects those factors, so a batch holds them instead of the full
  per-sample Jacobian.

Peak memory reuses the stages' own `planned_peak_bytes` (sui_core.linearized.ntk, sui_core.linearized.scores; for
the exact kernel `ntk.planned_kernel_peak_bytes`: the n·k × n·k kernel, its eigenvectors and LAPACK's
workspace, and `ntk.check_kernel_fits` refuses with the ntk stage's own message). The other
stages' peaks are estimated here from what they hold at once (documented per stage below). The rank r
of the eigenbasis is planned as its upper bound min(n·k, D): directions that are numerically null are
dropped by the ntk stage, so the real Z can only be smaller.

Disk is what the stages really write, not the raw values: Parquet compresses what is constant or zero
(blank pixels, Jacobian entries of switched-off ReLUs and of zero inputs: more than half of them for
MNIST). So the two compressible outputs are measured on a sample: `SAMPLE_ROWS` prepared rows and the
Jacobians of as many training samples (the seeded network, on the CPU) are written with the stages'
own writers, at two row counts, giving bytes per row and per file. From `data/prepared` the prepared
size is read off the files. For an `npz` source no rows are read and both stay raw upper bounds. The
dense float64 outputs (Z, the r×r Gram, the leave-one-out forms) are their raw size; plots and small
tables are a fixed allowance per stage (`SMALL_FILES`).

DVC then keeps a second copy of every output in its cache unless the cache type links instead: its
default `reflink,copy` copies on file systems without reflinks (ext4; this machine), so the plan adds a
"dvc cache" line of the same size; with reflinks (btrfs, XFS) or `cache.type` hardlink/symlink it adds
nothing. The params that change disk use are n (data.max_train, data.classes), D (jacobian.projection,
dims_per_tensor), k and the network (model.*); shard_rows, batch_size and block_size change only
memory and are never advised for disk.
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
from sui_core.linearized.scores import FIT, FORMS

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
    tensors: int  # tensors in its state_dict (torch.save adds a record per tensor)
    jacobian_count: int  # weights the Jacobian is taken against (P less the frozen ones)
    dim: int  # D, projected parameter count
    stored_values: int  # float32 values a sample's shard row holds besides f0: k·D, or its layer factors
    batch_values: int  # float32 values a sample holds while its batch is extracted (`_values_per_sample`)
    exact: bool  # jacobian.projection exact: layer factors, and the ntk stage builds the n·k × n·k kernel
    source: str  # where n came from: "prepared", "npz headers", or "source"
    # up to SAMPLE_ROWS rows of each split, as prepare writes them (only train from data/prepared;
    # None for npz headers: no rows read)
    sample: dict[str, Any] | None = None
    prepared_bytes: int | None = None  # what data/prepared holds, when the shapes came from it
    store_values: int = 0  # float32 values the store holds besides a batch (khatri_rao: its `held_values`)

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
    lower_memory: str  # the params that shrink this stage's peak, for the refusal message
    lower_disk: str  # the params that shrink its output
    detail: str  # how the numbers were obtained


@dataclass
class CachePlan:
    """The second copy of the outputs that DVC's cache keeps, if its cache type copies."""

    copies: bool
    why: str  # the cache type in effect and how it was found


@dataclass
class Plan:
    shapes: Shapes
    stages: list[StagePlan]
    cache: CachePlan

    @property
    def outputs_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.stages)

    @property
    def cache_bytes(self) -> int:
        return self.outputs_bytes if self.cache.copies else 0

    @property
    def disk_bytes(self) -> int:
        return self.outputs_bytes + self.cache_bytes

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak_bytes)


# ---- shapes --------------------------------------------------------------------------------------

SAMPLE_ROWS = 64  # rows per split written (prepared) and Jacobians computed to measure the disk use
SAMPLE_JACOBIAN_BYTES = 2**28  # full per-sample Jacobians held at once while sampling


def _some_rows(split: Any, m: int) -> Any:
    """A seeded random `m` of the rows of a `sui_core.data.splits.Split` (all if fewer), in order."""
    idx = np.sort(np.random.default_rng(0).choice(len(split), min(m, len(split)), replace=False))
    return dataclasses.replace(
        split,
        **{
            f.name: getattr(split, f.name)[idx]
            for f in dataclasses.fields(split)
            if isinstance(getattr(split, f.name), np.ndarray)
        },
    )


def _prepared_shapes(cfg: Any, prepared: Path) -> tuple[dict[str, int], tuple, int, dict, int] | None:
    """n per split, input shape, classes, a sample of the training rows and the bytes of `prepared` if
    it exists and was made from the data config `cfg` (compared with defaults filled in, so params added
    since it was made do not count)."""
    import pyarrow.parquet as pq

    from sui_core.data.splits import read_split

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
        sample = {"train": _some_rows(read_split(prepared / "train.parquet"), SAMPLE_ROWS)}
        held = sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file())
        return n, shape, classes, sample, held
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
            headers = {name: _npz_header(path, name, archive) for name in ("X_train", "X_val", "X_test")}
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


def data_shapes(
    params: dict[str, Any], prepared: str | Path = PREPARED
) -> tuple[dict[str, int], tuple, int, str, dict | None, int | None]:
    """(n per split, input shape, number of classes, where they came from, a sample of rows per split,
    the bytes of data/prepared) for the `data` params; see `Shapes` for the last two."""
    cfg = load_section(params, "data")
    found = _prepared_shapes(cfg, Path(prepared))
    if found is not None:
        n, shape, classes, sample, held = found
        return n, shape, classes, "prepared", sample, held
    if cfg.source == "npz":
        return (*_npz_shapes(cfg), "npz headers", None, None)
    from sui_core.data.splits import load_source

    raw = load_source(cfg)
    sample = {s: _some_rows(split, SAMPLE_ROWS) for s, split in raw.splits.items()}
    return (
        {s: len(split) for s, split in raw.splits.items()},
        tuple(raw.train.input_shape),
        raw.train.num_classes,
        "source",
        sample,
        None,
    )


def shapes(params: dict[str, Any], prepared: str | Path = PREPARED) -> Shapes:
    import torch

    from sui_core.linearized.factors import KhatriRaoProjector, make_store
    from sui_core.linearized.jacobians import jacobian_shapes

    n, input_shape, num_classes, where, sample, held = data_shapes(params, prepared)
    model, k = _network(params, input_shape, num_classes, device="meta")
    named = jacobian_shapes(model)
    jac = load_section(params, "jacobian")
    with torch.random.fork_rng(devices=[]):
        store = make_store(jac, model, input_shape)
    exact = store.kind == "exact"
    jacobian_count = sum(math.prod(shape) for shape in named.values())
    stored, batch = _values_per_sample(store, k, jacobian_count)
    return Shapes(
        n=n,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        k=k,
        param_count=sum(p.numel() for p in model.parameters()),
        state_count=sum(t.numel() for t in model.state_dict().values()),
        tensors=len(model.state_dict()),
        jacobian_count=jacobian_count,
        dim=store.total_dim,
        stored_values=stored,
        batch_values=batch,
        exact=exact,
        source=where,
        sample=sample,
        prepared_bytes=held,
        store_values=(
            store.held_values(min(jac.batch_size, max(n["train"], n["val"], 1)))
            if isinstance(store, KhatriRaoProjector)
            else 0
        ),
    )


def _values_per_sample(store: Any, k: int, jacobian_count: int) -> tuple[int, int]:
    """(float32 values of a sample's shard row besides f0, float32 values a sample holds while its batch
    is extracted) for the jacobians stage's store: exact its layer factors, held as computed and as
    concatenated; khatri_rao Φ (k·D), from its layer factors, Φ's blocks and Φ; the other projections
    Φ, from the full per-sample Jacobian (k × the trained parameters)."""
    from sui_core.linearized.factors import KhatriRaoProjector

    if store.kind == "exact":
        factors = sum(math.prod(s) for s in store.column_shapes().values())
        return factors, 2 * factors
    phi = k * store.total_dim
    if isinstance(store, KhatriRaoProjector):
        return phi, sum(math.prod(s) for s in store.layout.column_shapes().values()) + 2 * phi
    return phi, k * jacobian_count + phi


def _network(params: dict[str, Any], input_shape: tuple, num_classes: int, device: str):
    """(the network the model stage builds, k), seeded, without `init_path`. On the meta device
    (shapes without memory: a resnet50 is built in no time) unless an architecture needs real
    tensors to be built; then, or for device "cpu", on the CPU."""
    import torch

    from sui_core.network.models import build_model
    from sui_core.network.outputs import num_outputs

    k = num_outputs(num_classes)
    model_cfg = dataclasses.replace(load_section(params, "model"), init_path=None)
    if device == "meta":
        try:
            with torch.device("meta"):
                return build_model(model_cfg, input_shape, k), k
        except SuiError:
            raise
        except Exception:
            pass
    return build_model(model_cfg, input_shape, k), k


# ---- sizes ---------------------------------------------------------------------------------------

# Plots, meta.json, manifests and small tables of each stage: what the tiny and the default pipeline
# wrote, rounded (plots do not grow with n; they are most of score's and evaluate's output there).
SMALL_FILES = {
    "prepare": 4 << 10,
    "pretrain": 512,
    "model": 2 << 10,
    "jacobians": 3 << 10,
    "ntk": 4 << 10,
    "loo": 8 << 10,
    "score": 64 << 10,
    "evaluate": 112 << 10,
    "suspects": 64 << 10,  # its gallery and meta.json (the calibration record of every copy)
    "attribute": 512,
    "validate": 512,
}
NOT_PLANNED = 0  # the peak memory of a stage the plan has no model of (shown as "-")
VALIDATE_FILES = 96 << 10  # its scatter plot and tables, when validate.enabled
ATTRIBUTE_FILES = 96 << 10  # its gallery, when attribute.enabled
VALIDATE_ROW_BYTES = 128  # and a row of its tables per left-out sample
LDS_ROW_BYTES = 40  # and a row of lds.parquet per subset and validation target (2 ids, 3 outputs)
LDS_MEMBER_BYTES = 16  # and a row of lds_subsets.parquet per sample a subset keeps
NPZ_ARRAY_BYTES = 256  # an array's .npy header and its zip entries
TORCH_TENSOR_BYTES = 640  # torch.save's record per tensor
MANIFEST_SHARD_BYTES = 128  # a shard's entry in the Jacobian manifest (name, rows, sha256)
SCORE_COLUMNS = 12  # 8-byte values per sample in scores.parquet (ids, labels, 4 scores, rank, fit)
EVALUATE_COLUMNS = 13  # and in evaluate's detection_scores.parquet (ids, the detectors' scores)
SUSPECTS_ROW_BYTES = 80  # a row of suspects.parquet and suspects.csv together (measured: 34 + 42 B)
INFLUENCE_ROW_BYTES = 64  # a row of influences.parquet beyond its lists: id, label and predicted names
SUSPECTS_BASELINE_ROW_BYTES = 40  # and per suspects.baselines entry: its score and flag, Parquet + CSV


def jacobian_shard_bytes(rows: int, k: int, values: int) -> int:
    """Raw bytes of `rows` shard rows: sample_id int64, f0 k float64, `values` float32 (Φ's k·D, or the
    layer factors: `Shapes.stored_values`), no compression."""
    return rows * (8 + 8 * k + 4 * values)


def z_bytes(n: int, k: int, r: int) -> int:
    """Z (n, k, r) float64: the training rows in the eigenbasis."""
    return 8 * n * k * r


def _linear_bytes(full: int, half: int, rows: int) -> tuple[float, float]:
    """(bytes per file, bytes per row) of a writer that wrote `full` bytes for `rows` rows and `half`
    for rows // 2 of them."""
    if rows < 2:
        return 0.0, full / max(rows, 1)
    per_row = max(0.0, (full - half) / (rows - rows // 2))
    return max(0.0, full - per_row * rows), per_row


def parquet_bytes(table) -> int:
    """What `sui_core.io.write_parquet` writes for `table` (pq.write_table's defaults), in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.tell()


def prepared_bytes(sh: Shapes) -> tuple[int, str]:
    """data/prepared: its files when it exists, else prepare's own writer on the sample, else raw."""
    if sh.prepared_bytes is not None:
        return sh.prepared_bytes, "the files of data/prepared"
    n_all = sum(sh.n.values())
    if sh.sample is None:
        return n_all * (sh.features * 4 + 40) + SMALL_FILES[
            "prepare"
        ], f"{n_all} samples × {sh.features} float32 inputs, uncompressed (an upper bound)"
    import tempfile

    from sui_core.data.splits import RawData, write_splits

    def sizes(m: int) -> dict[str, int]:
        with tempfile.TemporaryDirectory() as tmp:
            write_splits(RawData(**{s: _some_rows(split, m) for s, split in sh.sample.items()}), tmp)
            return {s: (Path(tmp) / f"{s}.parquet").stat().st_size for s in SPLITS}

    rows = min([SAMPLE_ROWS, *(len(split) for split in sh.sample.values() if len(split))])
    full, half = sizes(rows), sizes(rows // 2)
    total = SMALL_FILES["prepare"]
    for s in SPLITS:
        fixed, per_row = _linear_bytes(full[s], half[s], rows)
        total += fixed + per_row * sh.n[s]
    return int(total), f"{n_all} samples × {sh.features} inputs, as Parquet writes a sample of {rows}"


def jacobian_bytes(sh: Shapes, params: dict[str, Any]) -> tuple[int, str]:
    """data/jacobians: the shards as `sui_core.linearized.jacobians` writes them, measured on the Jacobians of
    sample training rows (seeded network, CPU); raw bytes when there is no sample."""
    jac = load_section(params, "jacobian")
    n = sh.n["train"] + sh.n["val"]
    shards = sum(math.ceil(sh.n[s] / jac.shard_rows) for s in ("train", "val"))
    row = f"{sh.stored_values} layer-factor values" if sh.exact else f"k·D = {sh.k}·{sh.dim}"
    if sh.sample is None or not len(sh.sample["train"]):
        return jacobian_shard_bytes(n, sh.k, sh.stored_values) + SMALL_FILES[
            "jacobians"
        ], f"{n} rows × ({row} float32 + f0), uncompressed (an upper bound)"
    fixed, per_row = _jacobian_sample(sh, params)
    return int(shards * (fixed + MANIFEST_SHARD_BYTES) + n * per_row) + SMALL_FILES[
        "jacobians"
    ], f"{n} rows × {row}: {per_row:.0f} B a row as Parquet writes a sample"


def _jacobian_sample(sh: Shapes, params: dict[str, Any]) -> tuple[float, float]:
    """(bytes per shard file, bytes per row) of the Jacobian shards of the sampled training rows, made by
    the stage's own store (projector or layer factors): full Jacobians are computed SAMPLE_JACOBIAN_BYTES
    at a time, at most 8 such batches (a big network gets fewer rows) and at least 2 rows."""
    import torch

    from sui_core.linearized.factors import make_store
    from sui_core.linearized.jacobians import _shard_table

    jac = load_section(params, "jacobian")
    x = sh.sample["train"].x
    per_sample = 4 * sh.k * max(sh.jacobian_count, 1)
    rows = min(len(x), max(2, min(SAMPLE_JACOBIAN_BYTES * 8 // per_sample, SAMPLE_ROWS)))
    batch = max(1, SAMPLE_JACOBIAN_BYTES // per_sample)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(jac.seed)
        model, _ = _network(params, sh.input_shape, sh.num_classes, device="cpu")
        store = make_store(jac, model, sh.input_shape)
        dtype = next(model.parameters()).dtype
        batches = [
            store.shard_columns(model, torch.as_tensor(x[lo : min(lo + batch, rows)], dtype=dtype))
            for lo in range(0, rows, batch)
        ]
    columns = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    ids, half = np.arange(rows), rows // 2
    return _linear_bytes(
        parquet_bytes(_shard_table(ids, columns)),
        parquet_bytes(_shard_table(ids[:half], {name: a[:half] for name, a in columns.items()})) if half else 0,
        rows,
    )


def dvc_cache(root: str | Path = ".") -> CachePlan:
    """Whether `dvc repro` here keeps a second copy of each output in .dvc/cache (see the module doc)."""
    dvc_dir = Path(root) / ".dvc"
    if not dvc_dir.is_dir():
        return CachePlan(False, "no DVC repository here: stages run by hand are not cached")
    from dvc.config import Config

    config = Config(dvc_dir=str(dvc_dir))["cache"]
    types = config.get("type") or ["reflink", "copy"]
    types = [t.strip() for t in (types.split(",") if isinstance(types, str) else types)]
    cache_dir = Path(config.get("dir") or dvc_dir / "cache")
    where = f"cache.type {','.join(types)}" + ("" if config.get("type") else " (DVC's default)")
    for kind in types:
        if kind == "reflink" and _reflinks(cache_dir):
            return CachePlan(False, f"{where}: reflinks share the outputs' blocks")
        if kind in ("hardlink", "symlink"):
            return CachePlan(False, f"{where}: the outputs are links to the cache")
        if kind == "copy":
            return CachePlan(True, f"{where}: no reflinks on this file system, so a copy of every output")
    return CachePlan(False, where)


def _reflinks(directory: Path) -> bool:
    """Whether the file system of `directory` (or its nearest existing parent) can clone files (FICLONE)."""
    import fcntl
    import tempfile

    while not directory.exists():
        directory = directory.parent
    ficlone = 0x40049409  # linux/fs.h FICLONE
    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".sui-reflink-") as tmp:
            src = Path(tmp, "a")
            src.write_bytes(b"\0" * 4096)
            with open(src, "rb") as a, open(Path(tmp, "b"), "wb") as b:
                fcntl.ioctl(b.fileno(), ficlone, a.fileno())
        return True
    except OSError:
        return False


def ntk_plan(sh: Shapes, shard_rows: int) -> StagePlan:
    """basis.npz: Z, s, the r×r validation Gram (exact: and the validation rows W); residual.npz: sample
    ids and Y − f0. Memory: the stage's own plan, for the exact kernel or from Φ."""
    from sui_core.linearized import ntk

    n, n_val, k, dim, r = sh.n["train"], sh.n["val"], sh.k, sh.dim, sh.rank
    disk = z_bytes(n, k, r) + 8 * (r + r * r) + 8 * (n + n * k) + 8 * NPZ_ARRAY_BYTES + SMALL_FILES["ntk"]
    if sh.exact:
        kind, dims = ntk.RECOMMENDED_PROJECTION
        return StagePlan(
            "ntk",
            disk + z_bytes(n_val, k, r) + NPZ_ARRAY_BYTES,
            ntk.planned_kernel_peak_bytes(n, k, n_val, min(shard_rows, n_val), sh.stored_values),
            f"data.max_train, or jacobian.projection: {kind} with jacobian.dims_per_tensor: {dims}",
            "data.max_train",
            f"Z {n}·{k}·r={r} + W {n_val}·{k}·r float64 + r×r (exact: the {n * k}×{n * k} kernel from layer factors)",
        )
    return StagePlan(
        "ntk",
        disk,
        ntk.planned_peak_bytes(n, k, dim, min(shard_rows, max(n, 1))),
        "jacobian.dims_per_tensor or data.max_train",
        "jacobian.dims_per_tensor or data.max_train",
        f"Z {n}·{k}·r={r} float64 + r×r ({ntk.choose_space(n, k, dim)} space)",
    )


def attribute_plan(params: dict[str, Any], n: int, sizes: dict[str, int], k: int, r: int, block_size: int) -> StagePlan:
    """influences.parquet (a row per target: ids and supports of its proponents and opponents, k-vectors),
    the effect matrix when it is within attribute.matrix_limit_mb, a gallery; in memory the loo solve's
    peak, the targets' rows in the basis, the matrix and one block of effects."""
    from sui_core.linearized import scores

    a = load_section(params, "attribute")
    if not a.enabled:
        return StagePlan(
            "attribute", SMALL_FILES["attribute"], NOT_PLANNED, "-", "-", "nothing (attribute.enabled is false)"
        )
    m, n_val = len(a.targets) or sizes[a.split], sizes["val"]
    matrix = 4 * n * m * k if 4 * n * m * k <= a.matrix_limit_mb * 2**20 else 0
    return StagePlan(
        "attribute",
        INFLUENCE_ROW_BYTES * m + 32 * a.top * m + 24 * k * m + matrix + ATTRIBUTE_FILES + SMALL_FILES["attribute"],
        scores.planned_peak_bytes(n, k, r, block_size) + 8 * (n_val * k * r + block_size * m * k) + matrix,
        "attribute.targets, attribute.matrix_limit_mb or data.max_train",
        "attribute.targets, attribute.matrix_limit_mb or attribute.top",
        f"{m} targets × {a.top} proponents and opponents" + (f" + the {n} × {m} × {k} matrix" if matrix else ""),
    )


def make_plan(params: dict[str, Any], prepared: str | Path = PREPARED, root: str | Path = ".") -> Plan:
    from sui_core.linearized import scores

    sh = shapes(params, prepared)
    jac = load_section(params, "jacobian")
    loo = load_section(params, "loo")
    model_cfg = load_section(params, "model")
    n_all = sum(sh.n.values())
    n, n_val, k, r, p = sh.n["train"], sh.n["val"], sh.k, sh.rank, sh.param_count
    inputs = n_all * sh.features * 4
    n_disk = "data.max_train"  # n: the training rows of loo, score and evaluate
    net_disk = "model.hidden (or a smaller network)"
    state = 4 * sh.state_count + TORCH_TENSOR_BYTES * sh.tensors
    prepared_disk, prepared_detail = prepared_bytes(sh)
    jacobians_disk, jacobians_detail = jacobian_bytes(sh, params)
    validate = load_section(params, "validate")
    suspects = load_section(params, "suspects")
    stages = [
        # memory: the source as float64, as float32, and Arrow's copy
        StagePlan(
            "prepare",
            prepared_disk,
            4 * inputs,
            "data.max_train",
            "data.max_train (or fewer data.classes)",
            prepared_detail,
        ),
        # the pretrained body (a state_dict) only when model.pretrain, else an empty meta.json
        StagePlan(
            "pretrain",
            (state if model_cfg.pretrain else 0) + SMALL_FILES["pretrain"],
            NOT_PLANNED,
            net_disk,
            net_disk,
            "the network's state_dict" if model_cfg.pretrain else "nothing (model.pretrain is false)",
        ),
        # the state_dict in float32, and the model beside it
        StagePlan(
            "model",
            state + SMALL_FILES["model"],
            2 * 4 * sh.state_count,
            net_disk,
            net_disk,
            f"{p} parameters × 4 bytes",
        ),
        # one shard of what a sample stores in numpy and as an Arrow table, plus what one batch holds
        # (`Shapes.batch_values`: its full per-sample Jacobians and their projection; exact: its factors
        # and materialized blocks, as computed and as concatenated; khatri_rao: its factors and Φ, and
        # its rows U, V with one chunk of products); the inputs of one split
        StagePlan(
            "jacobians",
            jacobians_disk,
            2 * jacobian_shard_bytes(min(jac.shard_rows, max(n, n_val)), k, sh.stored_values)
            + 4 * min(jac.batch_size, max(n, 1)) * sh.batch_values
            + 4 * sh.store_values
            + (n + n_val) * sh.features * 4
            + 8 * p,
            "jacobian.shard_rows or jacobian.batch_size",
            "data.max_train or data.val_fraction"
            if sh.exact
            else "jacobian.dims_per_tensor (or a projection other than none), data.max_train or data.val_fraction",
            jacobians_detail,
        ),
        ntk_plan(sh, jac.shard_rows),
        # forms.parquet: sample_id + 4 float64 forms + 3 fit columns; the basis is loaded whole
        StagePlan(
            "loo",
            8 * n * (1 + len(FORMS) + len(FIT)) + SMALL_FILES["loo"],
            scores.planned_peak_bytes(n, k, r, loo.block_size) + 8 * (r * r + n * k),
            # r = D once n·k > D: then a smaller projection shrinks Z and the r×r matrices
            ("" if r == n * k else "jacobian.dims_per_tensor, ") + "loo.block_size or data.max_train",
            n_disk,
            f"{n} × ({len(FORMS)} forms + {len(FIT)} fit)",
        ),
        # disk only (their memory is not planned: NOT_PLANNED): scores.parquet and evaluate's detection
        # scores hold a row per training sample; plots
        StagePlan(
            "score",
            8 * SCORE_COLUMNS * n + SMALL_FILES["score"],
            NOT_PLANNED,
            n_disk,
            n_disk,
            f"{n} × {SCORE_COLUMNS} values + plots",
        ),
        StagePlan(
            "evaluate",
            8 * EVALUATE_COLUMNS * n + SMALL_FILES["evaluate"],
            NOT_PLANNED,
            n_disk,
            n_disk,
            f"{n} × {EVALUATE_COLUMNS} values + plots",
        ),
        StagePlan(
            "suspects",
            (SUSPECTS_ROW_BYTES + SUSPECTS_BASELINE_ROW_BYTES * len(suspects.baselines)) * n + SMALL_FILES["suspects"],
            # one leave-one-out solve at a time, as the loo stage's, on the same basis (the real network's
            # trainings of suspects.baselines, as evaluate's, are not planned)
            scores.planned_peak_bytes(n, k, r, loo.block_size) + 8 * (r * r + n * k),
            "loo.block_size or data.max_train",
            n_disk,
            f"{n} rows (Parquet + CSV) + a gallery",
        ),
        attribute_plan(params, n, sh.n, k, r, loo.block_size),
        StagePlan(
            "validate",
            (
                VALIDATE_FILES
                + VALIDATE_ROW_BYTES * validate.samples
                + validate.lds_subsets * (LDS_ROW_BYTES * n_val + LDS_MEMBER_BYTES * round(validate.lds_fraction * n))
                if validate.enabled
                else 0
            )
            + SMALL_FILES["validate"],
            NOT_PLANNED,
            "validate.samples",
            "validate.samples or validate.lds_subsets",
            f"{validate.samples} × {VALIDATE_ROW_BYTES} B + {validate.lds_subsets} × {n_val} × {LDS_ROW_BYTES} B"
            " + plots"
            if validate.enabled
            else "nothing (validate.enabled is false)",
        ),
    ]
    return Plan(sh, stages, dvc_cache(root))


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
    """SuiError (one line) when the largest peak does not fit in `memory` or the outputs in `disk`; for
    the exact kernel first the ntk stage's own refusal (`ntk.check_kernel_fits`)."""
    from sui_core.linearized.ntk import check_kernel_fits

    if plan.shapes.exact:
        ntk_peak = next(s.peak_bytes for s in plan.stages if s.stage == "ntk")
        check_kernel_fits(plan.shapes.n["train"], plan.shapes.k, ntk_peak, memory)
    peak = plan.peak
    if peak.peak_bytes > memory:
        raise SuiError(
            f"plan: stage {peak.stage} needs {human(peak.peak_bytes)} of memory at its peak, "
            f"{human(memory)} available; lower {peak.lower_memory}"
        )
    if plan.disk_bytes > disk:
        biggest = max(plan.stages, key=lambda s: s.disk_bytes)
        cache = f", the same again for DVC's cache copy ({plan.cache.why})" if plan.cache.copies else ""
        unlink = (
            "; or let DVC link instead of copy: `dvc config cache.type hardlink,symlink`" if plan.cache.copies else ""
        )
        raise SuiError(
            f"plan: the outputs need {human(plan.disk_bytes)} on disk (stage {biggest.stage}: "
            f"{human(biggest.disk_bytes)}{cache}), {human(disk)} free; lower {biggest.lower_disk}"
            f"{unlink}"
        )


def table(plan: Plan, memory: int, disk: int) -> str:
    sh = plan.shapes
    lines = [
        f"n = {sh.n['train']} train / {sh.n['val']} val / {sh.n['test']} test (from {sh.source}), "
        f"input {list(sh.input_shape)}, k = {sh.k}, P = {sh.param_count} parameters, D = {sh.dim}, "
        f"r ≤ {sh.rank}",
        f"{'stage':<10} {'disk':>12} {'peak memory':>12}  what",
    ]
    for s in plan.stages:
        peak = human(s.peak_bytes) if s.peak_bytes != NOT_PLANNED else "-"
        lines.append(f"{s.stage:<10} {human(s.disk_bytes):>12} {peak:>12}  {s.detail}")
    lines.append(f"{'dvc cache':<10} {human(plan.cache_bytes):>12} {'':>12}  {plan.cache.why}")
    lines.append(
        f"{'total':<10} {human(plan.disk_bytes):>12} {human(plan.peak.peak_bytes):>12}  "
        f"(largest peak: {plan.peak.stage})"
    )
    lines.append(f"available: {human(memory)} memory, {human(disk)} disk free: fits")
    return "\n".join(lines)
