"""A user's own data and torchvision's datasets: `imagefolder`, `parquet`, `torchvision_*`.

Each loader returns `(parts, input_shape)` as the built-in loaders in `sui_core.data.splits` do (`Loaded`):
`parts` maps train/val/test to a `Part` (sample ids, x, y, and optionally source, group, text, and parquet's
known label errors clean_y, noisy), with `y` the original labels (folder names, label-column values, dataset
targets) restricted to `data.classes`. Splits a
source brings along (train/val[/test] folders, a `split` column, torchvision's train/test files) are
kept; otherwise the pool is split with the seed as for the built-in sources.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sui_core.config import DataConfig
from sui_core.data.splits import Loaded, Part, _kept, _stratified_split
from sui_core.errors import DataError, ParamError

SPLITS = ("train", "val", "test")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # as ImageFolder
RESERVED = ("split", "source", "group", "clean_label", "noisy")  # parquet columns that are never features
FLAGS = ("clean_label", "noisy")  # parquet columns of known label errors (never features)

# source -> (torchvision class name, folder under root torchvision reads, files it expects there)
_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TORCHVISION = {
    "torchvision_mnist": ("MNIST", "MNIST/raw", _IDX),
    "torchvision_fashionmnist": ("FashionMNIST", "FashionMNIST/raw", _IDX),
    "torchvision_cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
    ),
    "torchvision_svhn": ("SVHN", ".", ("train_32x32.mat", "test_32x32.mat")),
}


def _select(y: np.ndarray, wanted: list) -> np.ndarray:
    """Indices of the samples whose label is in `wanted` (type-strict: 1 is not "1")."""
    keep = set(wanted)
    return np.flatnonzero(np.fromiter((v in keep for v in y.tolist()), bool, len(y)))


def _check_present(wanted: list, labels: np.ndarray, where: str) -> None:
    present = set(labels.tolist())
    absent = [c for c in wanted if c not in present]
    if absent:
        raise ParamError("data.classes", f"classes {absent} do not occur in {where}")


def _pool_or_given(cfg: DataConfig, y: np.ndarray, given: np.ndarray | None, where: str) -> dict[str, np.ndarray]:
    """Indices per split: `given` (split names per sample) kept as they are, else the seeded split."""

    wanted = list(cfg.classes) if cfg.classes is not None else sorted(set(y.tolist()))
    _check_present(wanted, y, where)
    keep = _select(y, wanted)
    if given is None:
        return _stratified_split(y, keep, cfg)
    return {name: keep[given[keep] == name] for name in SPLITS}


# ---------------------------------------------------------------- imagefolder


def load_imagefolder(cfg: DataConfig) -> Loaded:
    """root/<class>/<image> (any depth below the class folder), or root/{train,val[,test]}/<class>/<image>.

    Sample ids number every image file in (split folder, class, path) order, before `data.classes`
    selects, so they do not change with the classes chosen.
    """
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (data.root)")
    given = (root / "train").is_dir() and (root / "val").is_dir()
    folders = {n: root / n for n in SPLITS if (root / n).is_dir()} if given else {"pool": root}
    paths, names, split_of = [], [], []
    for part, folder in folders.items():
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>.png)")
        for class_dir in class_dirs:
            files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            paths += files
            names += [class_dir.name] * len(files)
            split_of += [part] * len(files)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMG_EXTENSIONS)}) in the class folders")
    y = np.array(names, dtype=object)
    cfg = dataclasses.replace(cfg, classes=None if cfg.classes is None else [str(c) for c in cfg.classes])
    index = _pool_or_given(cfg, y, np.array(split_of, dtype=object) if given else None, str(root))
    chosen = np.concatenate([index[n] for n in SPLITS])
    x_all, shape = _read_images([paths[i] for i in chosen], cfg, root)
    parts, start = {}, 0
    for name in SPLITS:
        idx = index[name]
        parts[name] = Part(idx, x_all[start : start + len(idx)], y[idx])
        start += len(idx)
    return parts, shape


def _read_images(paths: list[Path], cfg: DataConfig, root: Path) -> tuple[np.ndarray, list[int]]:
    """(n, C, H, W) float32 in [0, 1]; DataError naming a file that is unreadable or of another size."""
    from PIL import Image

    mode = "L" if cfg.grayscale else "RGB"
    arrays, first = [], None
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if cfg.image_size is not None:
                    height, width = cfg.image_size
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: unreadable image ({' '.join(str(exc).split())})") from exc
        if first is None:
            first = (path, array.shape)
        elif array.shape[:2] != first[1][:2]:
            raise DataError(
                f"{root}: images differ in size: {first[0]} is {first[1][0]}x{first[1][1]} (HxW), "
                f"{path} is {array.shape[0]}x{array.shape[1]}; set data.image_size: [H, W] to resize"
            )
        arrays.append(array)
    channels = 1 if cfg.grayscale else 3
    if not arrays:
        size = list(cfg.image_size) if cfg.image_size is not None else [1, 1]
        return np.zeros((0, channels, *size), np.float32), [channels, *size]
    x = np.stack(arrays).astype(np.float32) / np.float32(255.0)
    x = x[:, None] if cfg.grayscale else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), list(x.shape[1:])


# ---------------------------------------------------------------- parquet


def load_parquet(cfg: DataConfig) -> Loaded:
    """A table of features (numeric columns or one fixed-length list column) and labels; sample id = row.

    Optional known label errors, for the rows of every split (only the training split's are used
    downstream): `clean_label` (the clean label, same type and values as the label column) and/or
    `noisy` (bool, no nulls); the rules are those of `sui_core.data.splits._known_errors`."""
    path = Path(str(cfg.parquet_path)).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: parquet file not found (data.parquet_path)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable Parquet file ({' '.join(str(exc).split())})") from exc
    columns = table.column_names
    label = cfg.label_column
    if label not in columns:
        raise DataError(f"{path}: no label column {label!r} (data.label_column); columns: {', '.join(columns)}")
    if cfg.text_column is not None:
        x, _, text = _parquet_text(path, table, cfg.text_column)
    else:
        (x, _), text = _parquet_features(path, table, cfg), None
    y = _parquet_labels(path, label, table.column(label))
    clean, noisy = _parquet_flags(path, table, label, y)
    n = table.num_rows
    source = _string_column(path, table, "source", "parquet")
    group = _string_column(path, table, "group", None)
    given = None
    if "split" in columns:
        values = _string_column(path, table, "split", None)
        bad = [v for v in set(values.tolist()) if v not in SPLITS]
        if bad:
            raise DataError(
                f"{path}: column 'split' holds {sorted(map(str, bad))[0]!r} "
                f"({int(np.isin(values, bad).sum())} rows); allowed: train, val, test"
            )
        given = values
    index = _pool_or_given(cfg, y, given, str(path))
    if given is not None:
        for name in ("train", "val"):
            if not len(index[name]):
                raise DataError(f"{path}: column 'split' has no {name} rows (for the chosen classes)")
    ids = np.arange(n)
    parts = {
        name: Part(
            ids[idx],
            x[idx],
            y[idx],
            source[idx],
            group[idx],
            None if text is None else text[idx],
            None if clean is None else clean[idx],
            None if noisy is None else noisy[idx],
        )
        for name, idx in index.items()
    }
    return parts, [x.shape[1]]


def _parquet_flags(
    path: Path, table: pa.Table, label: str, y: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The optional columns `clean_label` (as the labels `y`: int64 or str) and `noisy` (bool); None when absent."""
    clean = noisy = None
    if "clean_label" in table.column_names and label != "clean_label":
        clean = _parquet_labels(path, "clean_label", table.column("clean_label"), "column")
        if clean.dtype != y.dtype:
            kinds = {np.dtype(object): "strings", np.dtype(np.int64): "integers"}
            raise DataError(
                f"{path}: column 'clean_label' must hold {kinds[y.dtype]} as the label column {label!r} does, "
                f"got {table.schema.field('clean_label').type}"
            )
    if "noisy" in table.column_names:
        col = table.column("noisy")
        if not pa.types.is_boolean(col.type):
            raise DataError(f"{path}: column 'noisy' must hold bools, got {col.type}")
        if col.null_count:
            raise DataError(f"{path}: column 'noisy' holds {col.null_count} null values")
        noisy = col.to_numpy(zero_copy_only=False).astype(bool)
    return clean, noisy


def _parquet_text(path: Path, table: pa.Table, name: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Averaged GloVe vectors of a string column (sui_core.data.text), and the texts themselves."""
    from sui_core.data.text import average_vectors

    if name not in table.column_names:
        raise DataError(f"{path}: no column {name!r} (data.text_column); columns: {', '.join(table.column_names)}")
    col = table.column(name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"{path}: text column {name!r} must hold strings, got {col.type}")
    if col.null_count:
        raise DataError(f"{path}: text column {name!r} holds {col.null_count} null values")
    texts = col.to_pylist()
    return average_vectors(texts, f"{path}: text column {name!r}"), [name], np.array(texts, dtype=object)


def _parquet_features(path: Path, table: pa.Table, cfg: DataConfig) -> tuple[np.ndarray, list[str]]:
    columns = table.column_names
    if cfg.vector_column is not None:
        name = cfg.vector_column
        if name not in columns:
            raise DataError(f"{path}: no column {name!r} (data.vector_column); columns: {', '.join(columns)}")
        col = table.column(name).combine_chunks()
        kind = col.type
        if not (
            pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        ) or not _numeric(kind.value_type):
            raise DataError(f"{path}: column {name!r} must be a list of numbers, got {kind}")
        if col.null_count:
            raise DataError(f"{path}: column {name!r} has {col.null_count} null rows")
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(
                f"{path}: column {name!r} is ragged: row {row} has {lengths[row]} values, "
                f"row 0 has {lengths[0]}; every row needs the same length"
            )
        width = int(lengths[0]) if len(lengths) else 0
        values = pc.list_flatten(col)
        nulls = values.null_count
        x = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), width)
        bad = int(np.count_nonzero(~np.isfinite(x))) + (nulls if not pa.types.is_floating(kind.value_type) else 0)
        if bad:
            raise DataError(f"{path}: column {name!r} holds {bad} NaN/Inf/null values")
        return x, [name]
    reserved = {cfg.label_column, *RESERVED}  # a string column (e.g. text) is never a default feature
    if cfg.feature_columns is not None:
        names = list(cfg.feature_columns)
        missing = [c for c in names if c not in columns]
        if missing:
            raise DataError(
                f"{path}: no feature column {missing[0]!r} (data.feature_columns); columns: {', '.join(columns)}"
            )
        for c in names:
            if c in FLAGS:
                raise DataError(f"{path}: column {c!r} flags known label errors, not a feature (data.feature_columns)")
            if not _numeric(table.schema.field(c).type):
                raise DataError(f"{path}: feature column {c!r} is not numeric ({table.schema.field(c).type})")
    else:
        names = [c for c in columns if c not in reserved and _numeric(table.schema.field(c).type)]
        if not names:
            raise DataError(f"{path}: no numeric feature columns (set data.feature_columns or data.vector_column)")
    x = np.empty((table.num_rows, len(names)), np.float64)
    for j, c in enumerate(names):
        col = table.column(c)
        x[:, j] = (
            col.to_numpy().astype(np.float64)
            if col.null_count == 0
            else pc.fill_null(pc.cast(col, pa.float64()), float("nan")).to_numpy()
        )
        bad = int(np.count_nonzero(~np.isfinite(x[:, j])))
        if bad:
            raise DataError(f"{path}: column {c!r} holds {bad} NaN/Inf/null values")
    return x, names


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _parquet_labels(path: Path, name: str, col: pa.ChunkedArray, what: str = "label column") -> np.ndarray:
    """int64 for integer (or integer-valued float) labels, an object array of str for string labels."""
    if col.null_count:
        raise DataError(f"{path}: {what} {name!r} holds {col.null_count} null values")
    kind = col.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return np.array(col.to_pylist(), dtype=object)
    if pa.types.is_integer(kind):
        return col.to_numpy().astype(np.int64)
    if pa.types.is_floating(kind):
        y = col.to_numpy()
        if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            return y.astype(np.int64)
    raise DataError(f"{path}: {what} {name!r} must hold integers or strings, got {kind}")


def _string_column(path: Path, table: pa.Table, name: str, fill: str | None) -> np.ndarray:
    """A str column as an object array, nulls replaced by `fill`; `fill` everywhere when it is absent."""
    if name not in table.column_names:
        return np.full(table.num_rows, fill, dtype=object)
    col = table.column(name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type)):
        raise DataError(f"{path}: column {name!r} must hold strings, got {col.type}")
    values = [fill if v is None else str(v) for v in col.to_pylist()]
    return np.array(values, dtype=object)


# ---------------------------------------------------------------- torchvision


def load_torchvision(cfg: DataConfig) -> Loaded:
    """torchvision's train/test files under `data.root`: validation from the train set by `val_fraction`,
    test = the whole test set (for the chosen classes); `test_fraction` is ignored, as for fashion_mnist.
    Sample ids: train index, then n_train + test index. Pixels in [0, 1]."""

    x_train, y_train = _torchvision_arrays(cfg, train=True)
    x_test, y_test = _torchvision_arrays(cfg, train=False)
    present = np.concatenate([y_train, y_test])
    index = _stratified_split(y_train, _kept(cfg, y_train, present), dataclasses.replace(cfg, test_fraction=0.0))
    index["test"] = _kept(cfg, y_test, present)
    parts = {}
    for name, idx in index.items():
        x, y, offset = (x_test, y_test, len(y_train)) if name == "test" else (x_train, y_train, 0)
        images = x[idx].astype(np.float32) / np.float32(255.0)
        parts[name] = Part(offset + idx, images, y[idx])
    return parts, list(x_train.shape[1:])


def _torchvision_arrays(cfg: DataConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n, C, H, W) uint8 images and int64 labels of one torchvision dataset part."""
    import torchvision.datasets

    class_name, folder, files = TORCHVISION[cfg.source]
    root = Path(str(cfg.root)).expanduser()
    where = (root / folder) if folder != "." else root
    kwargs = {"split": "train" if train else "test"} if cfg.source == "torchvision_svhn" else {"train": train}
    try:
        dataset = getattr(torchvision.datasets, class_name)(str(root), download=cfg.download, **kwargs)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        reason = "download failed: " + " ".join(str(exc).split()) if cfg.download else "files not found"
        raise DataError(
            f"{where}: {class_name} {reason} (data.source={cfg.source}; torchvision expects "
            f"{', '.join(files)} there); set data.download: true on a machine with internet, "
            "or copy the files there"
        ) from exc
    if cfg.source == "torchvision_svhn":
        x, y = np.asarray(dataset.data), np.asarray(dataset.labels)
    elif cfg.source == "torchvision_cifar10":
        x, y = np.asarray(dataset.data).transpose(0, 3, 1, 2), np.asarray(dataset.targets)
    else:
        x, y = dataset.data.numpy()[:, None], dataset.targets.numpy()
    return x, y.astype(np.int64)
