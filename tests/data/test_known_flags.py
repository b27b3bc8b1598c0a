"""Known label errors the user's data brings (npz y_train_clean/noisy, parquet columns clean_label/noisy):
the prepared splits' clean_label/noisy are built from them, by the rules of splits._known_errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sui_core.config import DataConfig
from sui_core.data.splits import load_source, prepare, read_split
from sui_core.errors import DataError, ParamError

# ---------------------------------------------------------------- npz


def _npz(tmp_path, classes=(2, 7), **extra):
    """40 training samples cycling through `classes`, 9 validation samples; returns (path, arrays)."""
    rng = np.random.default_rng(0)
    arrays = {
        "X_train": rng.normal(size=(40, 6)),
        "y_train": np.resize(classes, 40),
        "X_val": rng.normal(size=(9, 6)),
        "y_val": np.resize(classes, 9),
        **extra,
    }
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz", arrays


def _npz_cfg(path, **kw):
    return DataConfig(source="npz", npz_path=str(path), **{"label_noise": 0.0, **kw})


def test_npz_clean_labels_reach_the_written_train_split(tmp_path):
    classes = [2, 7, 9]
    y = np.resize(classes, 40)
    clean = y.copy()
    clean[[0, 4, 17]] = [9, 2, 7]  # given 2, 7, 9
    path, _ = _npz(tmp_path, classes, y_train_clean=clean)
    summary = prepare(_npz_cfg(path), tmp_path / "out")
    train = read_split(tmp_path / "out" / "train.parquet")
    index = {c: i for i, c in enumerate(classes)}
    np.testing.assert_array_equal(train.label, [index[v] for v in y])
    np.testing.assert_array_equal(train.clean_label, [index[v] for v in clean])
    expected = np.zeros(40, bool)
    expected[[0, 4, 17]] = True
    np.testing.assert_array_equal(train.noisy, expected)
    val = read_split(tmp_path / "out" / "val.parquet")
    assert not val.noisy.any() and np.array_equal(val.label, val.clean_label)
    assert summary["noisy"] == 3 and summary["known_errors"] == "user"
    assert summary["per_class_train"] == {"2": 14, "7": 13, "9": 13}  # counts of the clean labels


@pytest.mark.parametrize(
    "classes, dtype, clean_of_flagged",
    [
        ((2, 7), bool, [1, 0, 1]),  # 2 classes: the clean label is the other class
        ((2, 7), np.int8, [1, 0, 1]),  # 0/1 integers read as bools
        ((2, 7, 9), bool, [0, 2, 1]),  # more classes: unknown, so the given label
    ],
)
def test_npz_noisy_only(tmp_path, classes, dtype, clean_of_flagged):
    noisy = np.zeros(40, dtype)
    rows = [0, 5, 10]  # given labels: 2 7 2 (two classes), 2 9 7 (three classes)
    noisy[rows] = 1
    path, arrays = _npz(tmp_path, classes, noisy=noisy)
    raw = load_source(_npz_cfg(path))
    np.testing.assert_array_equal(raw.train.noisy, noisy.astype(bool))
    np.testing.assert_array_equal(raw.train.clean_label[rows], clean_of_flagged)
    others = np.setdiff1d(np.arange(40), rows)
    np.testing.assert_array_equal(raw.train.clean_label[others], raw.train.label[others])
    assert raw.known_errors == "user"


def test_npz_clean_label_outside_the_chosen_classes(tmp_path):
    clean = np.resize([2, 7], 40)
    clean[[3, 8]] = 5  # a class that data.classes does not choose (nor any given label has)
    path, _ = _npz(tmp_path, y_train_clean=clean)
    raw = load_source(_npz_cfg(path, classes=[2, 7]))
    assert raw.train.class_names == [2, 7]
    np.testing.assert_array_equal(np.flatnonzero(raw.train.noisy), [3, 8])
    np.testing.assert_array_equal(raw.train.clean_label, raw.train.label)  # unknown: the given label


def test_npz_flags_and_label_noise(tmp_path):
    path, _ = _npz(tmp_path, y_train_clean=np.resize([2, 7], 40))
    with pytest.raises(
        ParamError, match=r"data.label_noise: must be 0: .*d.npz .*\(array y_train_clean\).*label_noise: 0"
    ):
        load_source(_npz_cfg(path, label_noise=0.1))
    assert load_source(_npz_cfg(path)).known_errors == "user"
    (tmp_path / "plain").mkdir()
    plain, _ = _npz(tmp_path / "plain")
    assert load_source(_npz_cfg(plain, label_noise=0.1)).known_errors == "injected"
    assert load_source(_npz_cfg(plain)).known_errors == "none"


def test_npz_clean_and_noisy_disagree(tmp_path):
    clean = np.resize([2, 7], 40)
    clean[[6, 9]] = [7, 2]
    noisy = np.zeros(40, bool)
    noisy[[6, 11, 20]] = True  # 6 agrees; 9 is not flagged, 11 and 20 are but their clean label is the given one
    path, _ = _npz(tmp_path, y_train_clean=clean, noisy=noisy)
    with pytest.raises(
        DataError, match=r"d.npz: arrays y_train_clean and noisy disagree on 3 rows \(first: sample id 9\)"
    ):
        load_source(_npz_cfg(path))
    noisy[9], noisy[[11, 20]] = True, False
    path, _ = _npz(tmp_path, y_train_clean=clean, noisy=noisy)
    np.testing.assert_array_equal(np.flatnonzero(load_source(_npz_cfg(path)).train.noisy), [6, 9])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"y_train_clean": np.zeros(39, int)}, r"y_train has 40 samples, y_train_clean has shape \(39,\)"),
        ({"noisy": np.zeros((40, 1), bool)}, r"y_train has 40 samples, noisy has shape \(40, 1\)"),
        ({"y_train_clean": np.full(40, 2.5)}, r"labels not integers in y_train_clean"),
        ({"noisy": np.full(40, 2)}, r"noisy must be bool or 0/1 integers"),
        ({"noisy": np.zeros(40)}, r"noisy must be bool or 0/1 integers.*float64"),
    ],
)
def test_npz_flag_errors(tmp_path, extra, message):
    path, _ = _npz(tmp_path, **extra)
    with pytest.raises(DataError, match=f"{path}: .*{message}") as exc:
        load_source(_npz_cfg(path))
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------- parquet


def _table(**columns):
    """24 rows: labels 3 7 9 cycling, split 4 train / 2 val / 2 test per 8 rows, two numeric features."""
    rng = np.random.default_rng(1)
    return pa.table(
        {
            "f1": rng.normal(size=24),
            "f2": rng.integers(-5, 5, 24),
            "label": np.tile([3, 7, 9], 8),
            "split": (["train"] * 4 + ["val"] * 2 + ["test"] * 2) * 3,
            **columns,
        }
    )


def _parquet_cfg(tmp_path, table, **kw):
    pq.write_table(table, tmp_path / "t.parquet")
    return DataConfig(source="parquet", parquet_path=str(tmp_path / "t.parquet"), **{"label_noise": 0.0, **kw})


def _by_row(raw):
    """(label, clean_label, noisy) of every row id, over all three splits."""
    out = {}
    for split in raw.splits.values():
        for sid, a, b, c in zip(split.sample_id, split.label, split.clean_label, split.noisy):
            out[int(sid)] = (int(a), int(b), bool(c))
    return out


LABELS = np.tile([3, 7, 9], 8)
CLEAN = LABELS.copy()
CLEAN[[1, 6, 13]] = [9, 9, 3]  # a train, a test and a val row (given 7, 3, 7)
NOISY = CLEAN != LABELS


@pytest.mark.parametrize(
    "columns, clean_of_flagged",
    [
        ({"clean_label": CLEAN}, [2, 2, 0]),
        ({"noisy": NOISY}, [1, 0, 1]),  # 3 classes: the clean label is unknown, so the given one
        ({"clean_label": CLEAN, "noisy": NOISY}, [2, 2, 0]),
    ],
)
def test_parquet_flag_columns_every_split_never_features(tmp_path, columns, clean_of_flagged):
    raw = load_source(_parquet_cfg(tmp_path, _table(**columns), classes=[3, 7, 9]))
    assert raw.train.input_shape == (2,)  # f1, f2: neither flag column is a feature
    assert raw.known_errors == "user"
    rows = _by_row(raw)
    assert sorted(rows) == list(range(24))
    flagged = [1, 6, 13]
    assert [rows[i][1] for i in flagged] == clean_of_flagged
    assert sorted(i for i in rows if rows[i][2]) == flagged
    assert all(rows[i][0] == rows[i][1] for i in rows if i not in flagged)
    assert list(raw.val.sample_id[raw.val.noisy]) == [13] and list(raw.test.sample_id[raw.test.noisy]) == [6]


def test_parquet_string_labels_clean_outside_classes_and_prepared_file(tmp_path):
    labels = ["cat", "dog", "eel"] * 8
    clean = list(labels)
    clean[0], clean[1], clean[2] = "dog", "eel", "cat"  # cat→dog; dog→eel (not chosen); eel→cat (row dropped)
    table = _table(clean_label=clean).set_column(2, "label", pa.array(labels))
    summary = prepare(_parquet_cfg(tmp_path, table, classes=["dog", "cat"]), tmp_path / "out")
    train = read_split(tmp_path / "out" / "train.parquet")
    np.testing.assert_array_equal(train.sample_id, [0, 1, 3, 9, 10, 16, 18, 19])
    np.testing.assert_array_equal(train.label, [1, 0, 1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(train.noisy, [True, True, False, False, False, False, False, False])
    np.testing.assert_array_equal(train.clean_label, [0, 0, 1, 1, 0, 0, 1, 0])  # row 1 (dog→eel): unknown
    assert summary["known_errors"] == "user" and summary["noisy"] == 2


def test_parquet_flags_disagree_and_label_noise(tmp_path):
    noisy = NOISY.copy()
    noisy[[2, 13]] = [True, False]  # a train row and a val row
    cfg = _parquet_cfg(tmp_path, _table(clean_label=CLEAN, noisy=noisy))
    with pytest.raises(
        ParamError, match=r"data.label_noise: must be 0: .*t.parquet .*columns 'clean_label' and 'noisy'"
    ):
        load_source(DataConfig(source="parquet", parquet_path=cfg.parquet_path))  # default label_noise 0.1
    with pytest.raises(
        DataError, match=r"t.parquet: columns 'clean_label' and 'noisy' disagree on 2 rows \(first: sample id 2\)"
    ):
        load_source(cfg)


@pytest.mark.parametrize(
    "columns, kw, message",
    [
        ({"noisy": np.arange(24) % 2}, {}, r"column 'noisy' must hold bools, got int64"),
        ({"noisy": pa.array([None] + [False] * 23, pa.bool_())}, {}, r"column 'noisy' holds 1 null values"),
        ({"clean_label": pa.array([None] + [3] * 23, pa.int64())}, {}, r"column 'clean_label' holds 1 null values"),
        ({"clean_label": ["3"] * 24}, {}, r"column 'clean_label' must hold integers as the label column 'label'"),
        ({"clean_label": np.full(24, 2.5)}, {}, r"column 'clean_label' must hold integers or strings"),
        (
            {"clean_label": LABELS},
            {"feature_columns": ["f1", "clean_label"]},
            r"column 'clean_label' flags known label",
        ),
    ],
)
def test_parquet_flag_errors(tmp_path, columns, kw, message):
    cfg = _parquet_cfg(tmp_path, _table(**columns), **kw)
    with pytest.raises(DataError, match=f"{cfg.parquet_path}: {message}") as exc:
        load_source(cfg)
    assert "\n" not in str(exc.value)
