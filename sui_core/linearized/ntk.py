"""The eigenbasis that every leave-one-out problem is solved in.

H = ΦᵀΦ + λI shares its eigenvectors with ΦᵀΦ for every λ, so the basis does not depend on the
training params. It is built in the smaller of the two spaces (DESIGN.md §3):

- primal (D ≤ nk): eigendecompose ΦᵀΦ = Q diag(s) Qᵀ (D×D, summed over shards), Z = Φ Q;
- kernel (D > nk): eigendecompose ΦΦᵀ = U diag(s) Uᵀ (nk×nk); with V = Φᵀ U s^{-1/2}, Z = U s^{1/2}.
  Every Φ_i and Φᵀr lie in span(V), so nothing outside it ever moves.

Either way Z holds the training rows in an orthonormal basis of rank r ≤ min(nk, D): all inner
products of Jacobians are preserved, which is all the scores need. Directions whose eigenvalue is
below rank_rtol·max(s) are numerically null and dropped.

The kernel space needs only kernels, not Φ: `basis_from_kernels` takes K = ΦΦᵀ and Θ(val, train) =
Φ_val Φᵀ however they were computed (from Φ by `build_basis`, or from layer factors for the exact
kernel, `sui_core.linearized.factors`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sui_core.errors import ArtifactError, ParamError
from sui_core.io import read_npz, write_npz
from sui_core.linearized.rows import RowFile

PhiChunks = Callable[[], Iterable[np.ndarray]]  # a fresh iterator of (b, k, D) blocks on each call


@dataclass
class Basis:
    space: str  # "primal" or "kernel"
    s: np.ndarray  # (r,) eigenvalues of ΦᵀΦ, descending
    z: np.ndarray  # (n, k, r) training Jacobians in the basis
    gram_val: np.ndarray  # (r, r) Σ_j W_jᵀW_j over validation samples: F-SI's metric
    n_val: int
    dim: int  # D, the projected parameter count
    # (n_val, k, r) W: the validation rows in the basis, kept where nothing else can give them (the
    # exact kernel has no Φ on disk); None where Φ_val can (`val_rows_from_cross`)
    val_rows: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def save(self, path: str | Path) -> None:
        # val_rows only when present: the bases of projected Jacobians keep the bytes they always had
        extra = {} if self.val_rows is None else {"val_rows": self.val_rows}
        write_npz(
            path,
            space=np.array(self.space),
            s=self.s,
            z=self.z,
            gram_val=self.gram_val,
            n_val=np.array(self.n_val),
            dim=np.array(self.dim),
            **extra,
        )

    @classmethod
    def load(cls, path: str | Path) -> Basis:
        a = read_npz(path, ["space", "s", "z", "gram_val", "n_val", "dim"])
        basis = cls(str(a["space"]), a["s"], a["z"], a["gram_val"], int(a["n_val"]), int(a["dim"]), a.get("val_rows"))
        r = basis.rank
        if basis.z.ndim != 3 or basis.z.shape[2] != r or basis.gram_val.shape != (r, r):
            raise ArtifactError(
                f"{path}: inconsistent basis shapes z={basis.z.shape} gram_val={basis.gram_val.shape} rank={r}"
            )
        if basis.val_rows is not None and basis.val_rows.shape != (basis.n_val, basis.z.shape[1], r):
            raise ArtifactError(
                f"{path}: val_rows has shape {basis.val_rows.shape}, expected {(basis.n_val, basis.z.shape[1], r)}"
            )
        return basis


def choose_space(n: int, k: int, dim: int) -> str:
    return "primal" if dim <= n * k else "kernel"


def planned_peak_bytes(n: int, k: int, dim: int, shard_rows: int) -> int:
    """What `build_basis` holds at its peak, in bytes (float64): in primal space the D×D Grams of the
    training and validation sets, the eigenvectors and Z, plus one shard; in kernel space Φ (float32,
    as stored), the kernel, its eigenvectors, Z, the float64 blocks of `_products` and one shard."""
    r = min(n * k, dim)
    shard = shard_rows * k * dim * (4 + 8)  # float32 as read, float64 as used
    if choose_space(n, k, dim) == "primal":
        return 8 * (3 * dim * dim + n * k * r) + shard
    return 4 * n * k * dim + 8 * (2 * (n * k) ** 2 + 2 * n * k * r) + 2 * 2**28 + shard


def planned_kernel_peak_bytes(n: int, k: int, n_val: int, val_rows: int, values_per_sample: int) -> int:
    """What the ntk stage holds at its peak for the exact kernel, in bytes: the nk×nk kernel K (float64)
    with LAPACK syevd's eigenvectors and workspace (2·(nk)²) beside it (4·(nk)² in all: also what K,
    U, U s^{∓1/2} and the r×r validation Gram take later, r ≤ nk), the validation rows W (n_val·k × r)
    and one block of Θ(val, train) (val_rows samples), the float32 factors of the training set and one
    validation shard (`values_per_sample` each), and `factors.kernel`'s block temporaries (3 × 2^28)."""
    nk = n * k
    return 8 * (4 * nk * nk + (n_val + val_rows) * k * nk) + 4 * values_per_sample * (n + val_rows) + 3 * 2**28


RECOMMENDED_PROJECTION = ("khatri_rao", 8000)  # where the exact kernel does not fit (docs/results.md)


def check_kernel_fits(n: int, k: int, peak: int, available: int) -> None:
    """ParamError (one line) when the exact kernel's planned peak exceeds the available memory; it
    recommends `RECOMMENDED_PROJECTION`, the projection measured closest to the exact scores at a cost
    of seconds (docs/results.md, "Projections when the exact kernel does not fit")."""
    if peak > available:
        kind, dims = RECOMMENDED_PROJECTION
        raise ParamError(
            "jacobian.projection",
            f"exact: the {n * k}×{n * k} kernel (n·k = {n}·{k}) needs {peak / 2**30:.1f} GiB of memory at its "
            f"peak, {available / 2**30:.1f} GiB available; use jacobian.projection: {kind} with "
            f"jacobian.dims_per_tensor: {dims} (its basis is D × D once n·k > D; lower dims_per_tensor if that "
            f"does not fit) or lower data.max_train",
        )


def val_rows_from_cross(cross: np.ndarray, z: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The validation rows W (n_val, k, r) in the basis from Θ(val, train) = Φ_val Φᵀ (n_val·k × n·k):
    W = Φ_val V with V = Φᵀ Z s⁻¹ in either space (primal: Z = Φ Q, so Φᵀ Z s⁻¹ = ΦᵀΦ Q s⁻¹ = Q;
    kernel: Z = U s^{1/2} and V = Φᵀ U s^{-1/2} = Φᵀ Z s⁻¹), so W = cross Z s⁻¹."""
    n, k, r = z.shape
    return (cross @ z.reshape(n * k, r) / s).reshape(-1, k, r)


def val_rows_in_basis(phi: np.ndarray, phi_val: np.ndarray, basis: Basis) -> np.ndarray:
    """The validation rows W (n_val, k, r) in the basis (`val_rows_from_cross`) from in-memory Φ (n, k, D)
    and Φ_val (n_val, k, D)."""
    n, k, _ = basis.z.shape
    cross = _products(phi_val.reshape(-1, phi.shape[-1]), phi.reshape(n * k, -1))
    return val_rows_from_cross(cross, basis.z, basis.s)


def basis_from_kernels(
    k_train: np.ndarray,
    k_val_train: np.ndarray | Iterable[np.ndarray],
    n: int,
    k: int,
    n_val: int | None,
    dim: int,
    rank_rtol: float | None = None,
) -> Basis:
    """The kernel-space basis from K = Θ(train, train) (nk × nk) and Θ(val, train) (n_val·k × nk, or an
    iterable of row blocks of it, whole samples each: gram_val is summed block by block):
    K = U diag(s) Uᵀ, Z = U s^{1/2}, W = Θ(val, train) U s^{-1/2} (the validation rows in the basis
    V = Φᵀ U s^{-1/2}, which is never formed), gram_val = WᵀW, val_rows = W. `n_val` None: as many
    validation samples as the blocks hold. Eigenvalues below rank_rtol·max(s) are dropped (default
    max(nk, dim)·eps)."""
    if k_train.shape != (n * k, n * k):
        raise ArtifactError(f"expected {n} training samples in the kernel, found {k_train.shape[0] // k}")
    if rank_rtol is None:
        rank_rtol = max(n * k, dim) * np.finfo(np.float64).eps
    s, u = _top_eigen(k_train, rank_rtol)
    z = (u * np.sqrt(s)).reshape(n, k, -1)
    to_basis = u / np.sqrt(s)
    del u
    gram_val = np.zeros((len(s), len(s)))
    rows = []
    for cross in [k_val_train] if isinstance(k_val_train, np.ndarray) else k_val_train:
        w = cross @ to_basis
        gram_val += w.T @ w
        rows.append(w.reshape(-1, k, len(s)))
    val_rows = np.concatenate(rows) if rows else np.zeros((0, k, len(s)))
    if n_val is not None and len(val_rows) != n_val:
        raise ArtifactError(f"expected {n_val} validation samples in the kernel, found {len(val_rows)}")
    return Basis("kernel", s, z, gram_val, len(val_rows), dim, val_rows)


def build_basis(
    train: PhiChunks,
    val: PhiChunks,
    n: int,
    k: int,
    dim: int,
    rank_rtol: float | None = None,
    z_path: str | Path | None = None,
) -> Basis:
    """Eigenbasis of ΦᵀΦ from streamed Jacobian blocks; train is read twice in primal space. The basis
    keeps no val_rows: Φ_val gives them (`val_rows_from_cross`). With `z_path` (primal space only) Z is
    written there as a `rows.RowFile` instead of held in memory, for n·k·r beyond memory (the basis
    then cannot be `save`d; the leave-one-out solve reads it by blocks)."""
    space = choose_space(n, k, dim)
    if rank_rtol is None:
        rank_rtol = max(n * k, dim) * np.finfo(np.float64).eps
    if space == "primal":
        s, q = _top_eigen(_gram(train, dim), rank_rtol)
        z = np.empty((n, k, len(s))) if z_path is None else RowFile.create(z_path, (n, k, len(s)))
        filled = 0
        for phi in train():
            if filled + len(phi) > n:
                raise ArtifactError(f"more than the expected {n} training samples in the Jacobian shards")
            z[filled : filled + len(phi)] = (_rows(phi) @ q).reshape(len(phi), k, -1)
            filled += len(phi)
        # Q^T (Σ Φ_valᵀΦ_val) Q: cheaper than projecting every validation row when r ≈ D.
        gram_val, n_val = _gram(val, dim, count=True)
        gram_val = q.T @ gram_val @ q
        if filled != n:
            raise ArtifactError(f"expected {n} training samples in the Jacobian shards, found {filled}")
        return Basis(space, s, z, gram_val, n_val, dim)
    if z_path is not None:
        raise ValueError(f"z on disk is for the primal space (D ≤ nk); here D = {dim} > nk = {n * k}")
    # (nk, D) kept in the blocks' dtype (float32 shards stay float32); every product in float64
    phi_all = np.concatenate([np.asarray(phi).reshape(-1, phi.shape[-1]) for phi in train()])
    filled = phi_all.shape[0] // k
    if filled != n:
        raise ArtifactError(f"expected {n} training samples in the Jacobian shards, found {filled}")
    crosses = (_products(np.asarray(phi).reshape(-1, phi.shape[-1]), phi_all) for phi in val())
    basis = basis_from_kernels(_products(phi_all, phi_all), crosses, n, k, None, dim, rank_rtol)
    return dataclasses.replace(basis, val_rows=None)


def _gram(chunks: PhiChunks, dim: int, count: bool = False):
    """Σ ΦᵀΦ over the streamed blocks (D×D), and optionally the number of samples seen."""
    gram = np.zeros((dim, dim))
    seen = 0
    for phi in chunks():
        rows = _rows(phi)
        gram += rows.T @ rows
        seen += len(phi)
    return (gram, seen) if count else gram


def _products(a: np.ndarray, b: np.ndarray, block_bytes: int = 2**28) -> np.ndarray:
    """a @ bᵀ in float64, converting column blocks of float32 inputs at a time (no float64 copy of b)."""
    if a.dtype == np.float64 and b.dtype == np.float64:
        return a @ b.T
    cols = max(1, block_bytes // (8 * max(a.shape[0], b.shape[0])))
    out = np.zeros((a.shape[0], b.shape[0]))
    for lo in range(0, a.shape[1], cols):
        out += np.asarray(a[:, lo : lo + cols], dtype=np.float64) @ np.asarray(b[:, lo : lo + cols], dtype=np.float64).T
    return out


def _rows(phi: np.ndarray) -> np.ndarray:
    return np.asarray(phi, dtype=np.float64).reshape(-1, phi.shape[-1])


def _top_eigen(sym: np.ndarray, rank_rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric PSD matrix, descending, without the numerically null ones."""
    evals, evecs = np.linalg.eigh(sym)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    keep = evals > rank_rtol * max(evals[0], 0.0) if len(evals) else np.zeros(0, bool)
    return evals[keep].copy(), np.ascontiguousarray(evecs[:, keep])
