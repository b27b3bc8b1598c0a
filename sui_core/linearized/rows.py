"""Z on disk, for when the n × k × r float64 training rows of the basis do not fit in memory.

At n = 10⁶, k = 1, r = 4,096 Z is 32.8 GB. The leave-one-out solve only ever needs it a block of
samples at a time (`solver.loo_deltas`, `scores.sgd_precision`, `scores.loo_quadratic_forms`), plus two
reductions over all samples, Σ_i Z_iᵀ r_i and Z c (`residual_contraction`, `rows_times`). `RowFile` holds
it in a .npy file and reads and writes row ranges with plain file I/O: np.memmap would do the same
arithmetic, but every page it touches stays resident and counts in the process's memory until the kernel
wants it back, so a streamed pass over 32 GB would look (and, on a loaded machine, act) like 32 GB held.
Here a process holds one block at a time (bench/bench_million.py measures it).

In-memory arrays take the same functions with one BLAS call each, exactly as before `RowFile` existed
(same bytes of every score).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

BLOCK_ROWS = 8192  # samples per read in the reductions over all samples


class RowFile:
    """A C-ordered (n, ...) array in a .npy file, indexed by row slices only (reads return new arrays)."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: np.dtype, offset: int):
        self.path, self.shape, self.dtype, self.offset = Path(path), tuple(shape), np.dtype(dtype), offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._last: tuple[tuple[int, int], np.ndarray] | None = None  # the solve reads each block twice

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, ...], dtype=np.float64) -> RowFile:
        """A new file of `shape` (zeros, sparse until written)."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.truncate(offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return cls(path, shape, dtype, offset)

    @classmethod
    def open(cls, path: str | Path) -> RowFile:
        with open(path, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran:
                raise ValueError(f"{path}: Fortran-ordered arrays cannot be read by rows")
            return cls(path, shape, dtype, f.tell())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, key: slice) -> tuple[int, int]:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"RowFile is indexed by contiguous row slices only, got {key!r}")
        lo, hi, _ = key.indices(self.shape[0])
        return lo, max(lo, hi)

    def __getitem__(self, key: slice) -> np.ndarray:
        """Rows `key` (read-only: the same array comes back when the same rows are read again)."""
        lo, hi = self._rows(key)
        if self._last is not None and self._last[0] == (lo, hi):
            return self._last[1]
        out = np.empty((hi - lo, *self.shape[1:]), self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.offset + lo * self.row_bytes)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise OSError(f"{self.path}: short read of rows {lo}:{hi}")
        out.flags.writeable = False
        self._last = ((lo, hi), out)
        return out

    def __setitem__(self, key: slice, value: np.ndarray) -> None:
        lo, hi = self._rows(key)
        self._last = None
        block = np.ascontiguousarray(value, dtype=self.dtype).reshape((hi - lo, *self.shape[1:]))
        with open(self.path, "r+b") as f:
            f.seek(self.offset + lo * self.row_bytes)
            f.write(memoryview(block).cast("B"))


def row_blocks(z, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block of `rows`, default BLOCK_ROWS) over all rows of an array or `RowFile`."""
    rows = rows or BLOCK_ROWS
    for lo in range(0, len(z), rows):
        yield lo, z[lo : lo + rows]


def contiguous_range(n: int, rank: int, world_size: int) -> range:
    """The samples of `rank`: n split into `world_size` contiguous ranges whose sizes differ by at most 1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def residual_contraction(z, residual: np.ndarray) -> np.ndarray:
    """Σ_i Z_iᵀ r_i (r,), for Z (n, k, r) in memory or in a `RowFile`."""
    if isinstance(z, np.ndarray):
        return np.einsum("nkr,nk->r", z, residual)
    total = np.zeros(z.shape[2])
    for lo, block in row_blocks(z):
        total += np.einsum("nkr,nk->r", block, residual[lo : lo + len(block)])
    return total


def rows_times(z, c: np.ndarray) -> np.ndarray:
    """Z c (n, k), for Z (n, k, r) in memory or in a `RowFile`."""
    if isinstance(z, np.ndarray):
        return np.einsum("nkr,r->nk", z, c)
    return np.concatenate([np.einsum("nkr,r->nk", block, c) for _, block in row_blocks(z)])
