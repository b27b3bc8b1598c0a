"""Per-sample Jacobians of the network outputs at w0, their random projection, and the shard files.

The NTK of a linearized network is Θ(x, x') = J(x) J(x')ᵀ, but J has one column per weight: too many to
store for every sample. Following the paper (section 5, "Efficient implementation") each parameter
tensor is projected separately to p = dims_per_tensor dimensions, scaled so that E[Φ(x) Φ(x')ᵀ] = Θ(x,
x'); tensors are kept apart so that a layer with small gradients is not drowned by a large one.
Φ(x) = [J_1(x)P_1ᵀ … J_L(x)P_Lᵀ] ∈ R^{k×D}, D = Σ p_l, is written to Parquet shards with a manifest
that records the projection and a sha256 per shard, so the ntk stage can trust what it reads.

Projection `exact` keeps every coordinate without materializing J: the shards hold per-layer factors
instead (`sui_core.linearized.factors`), written by the same `extract` and checked by the same reader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.func import functional_call, jacrev, vmap
from tqdm import tqdm

from sui_core.config import JacobianConfig
from sui_core.errors import ArtifactError, ParamError
from sui_core.io import file_sha256, read_json, read_parquet, write_json, write_parquet
from sui_core.linearized.rows import contiguous_range

MANIFEST_NAME = "manifest.json"
PHI_DTYPE = "float32"


SPLITS = ("train", "val")  # the splits whose Jacobians are computed (the test split is never scored)


def _generator(*key: int) -> torch.Generator:
    """A CPU generator for one (seed, tensor[, chunk]) key, hashed so nearby keys give unrelated streams."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class Projector:
    """Maps per-tensor Jacobians (B, k, *shape) to Φ (B, k, D), one block of columns per tensor in order.

    Subclasses fix how many dimensions each tensor gets (`dims`) and project one flattened tensor.
    """

    kind = ""

    def __init__(self, named_shapes: dict[str, torch.Size], dims_per_tensor: int, seed: int):
        self.shapes = {name: torch.Size(shape) for name, shape in named_shapes.items()}
        self.dims_per_tensor = dims_per_tensor
        self.seed = seed
        self.dims = {name: self._dim(shape.numel()) for name, shape in self.shapes.items()}

    def _dim(self, numel: int) -> int:
        return min(self.dims_per_tensor, numel)

    @property
    def total_dim(self) -> int:
        return sum(self.dims.values())

    def project(self, jac: dict[str, torch.Tensor]) -> torch.Tensor:
        if list(jac) != list(self.shapes):
            raise ValueError(f"Jacobian tensors {list(jac)} do not match the projector's {list(self.shapes)}")
        blocks = [self._project_tensor(i, name, jac[name].flatten(2)) for i, name in enumerate(self.shapes)]
        return torch.cat(blocks, dim=2)

    def _project_tensor(self, index: int, name: str, flat: torch.Tensor) -> torch.Tensor:
        """(B, k, numel) -> (B, k, dims[name]) for the tensor at position `index`."""
        raise NotImplementedError

    def jacobians(
        self, model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[np.ndarray, np.ndarray]:
        """f0 (B, k) float64 and Φ (B, k, D) in `dtype` of the batch x."""
        f0, jac = per_sample_jacobians(model, x)
        return f0.to(torch.float64).cpu().numpy(), self.project(jac).to(dtype).cpu().numpy()

    def shard_columns(self, model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
        """What a shard stores of the batch x: f0 and Φ in float32."""
        f0, phi = self.jacobians(model, x)
        return {"f0": f0, "phi": phi}

    def describe(self) -> dict[str, Any]:
        """What the manifest records: enough to rebuild the projector and to map Φ's columns to tensors."""
        tensors, offset = [], 0
        for name, shape in self.shapes.items():
            tensors.append({"name": name, "shape": list(shape), "dim": self.dims[name], "offset": offset})
            offset += self.dims[name]
        return {
            "kind": self.kind,
            "seed": self.seed,
            "dims_per_tensor": self.dims_per_tensor,
            "tensors": tensors,
            "D": self.total_dim,
        }


class IdentityProjector(Projector):
    """No projection: Φ is the full Jacobian (D = number of parameters). Exact, for small networks."""

    kind = "none"

    def _dim(self, numel: int) -> int:
        return numel

    def _project_tensor(self, index: int, name: str, flat: torch.Tensor) -> torch.Tensor:
        return flat


class CoordinateProjector(Projector):
    """The paper's method: p coordinates per tensor drawn without replacement, scaled by sqrt(numel/p).

    Each coordinate is kept with probability p/numel, so the scaled dot product is unbiased. Costs a gather
    of p columns per tensor: negligible next to computing the Jacobian itself.
    """

    kind = "coordinates"

    def __init__(self, named_shapes: dict[str, torch.Size], dims_per_tensor: int, seed: int):
        super().__init__(named_shapes, dims_per_tensor, seed)
        self._index, self._scale = {}, {}
        for i, (name, shape) in enumerate(self.shapes.items()):
            numel, p = shape.numel(), self.dims[name]
            perm = torch.randperm(numel, generator=_generator(seed, i)) if p < numel else torch.arange(numel)
            self._index[name] = perm[:p].sort().values
            self._scale[name] = math.sqrt(numel / p)

    def _project_tensor(self, index: int, name: str, flat: torch.Tensor) -> torch.Tensor:
        return flat[..., self._index[name].to(flat.device)] * self._scale[name]


class DenseProjector(Projector):
    """Dense Johnson–Lindenstrauss projection per tensor: P (p × numel) with E[PᵀP] = I, Rademacher entries
    ±1/sqrt(p) for kind `rademacher`, else Gaussian N(0, 1/p) (kind `gaussian`, and the materialized
    tensors of `sui_core.linearized.factors.KhatriRaoProjector`).

    P is never held whole (p × numel can be gigabytes): it is regenerated on the CPU, CHUNK_COLS columns at
    a time, each chunk from its own seed (seed, tensor index, chunk index), so it is the same for every
    batch, run and device (on a GPU the chunks are generated on the CPU and copied). Cost per batch:
    p·numel random numbers (about 1.6e8/s on one CPU core) plus B·k·p·numel multiply-adds: for a 784×1024
    layer at p = 2000 that is 1.6e9 numbers and, at B = 64, about 30 s on two CPU cores. Use a large
    batch_size to amortize the generation; the `coordinates` kind costs next to nothing.
    """

    CHUNK_COLS = 4096

    def __init__(self, named_shapes: dict[str, torch.Size], dims_per_tensor: int, seed: int, kind: str):
        super().__init__(named_shapes, dims_per_tensor, seed)
        self.kind = kind

    def _chunk(self, index: int, chunk: int, width: int, p: int) -> torch.Tensor:
        """Columns [chunk·CHUNK_COLS, +width) of Pᵀ, as a (width, p) float32 tensor."""
        gen = _generator(self.seed, index, chunk)
        if self.kind != "rademacher":
            return torch.randn(width, p, generator=gen) / math.sqrt(p)
        signs = torch.randint(0, 2, (width, p), generator=gen, dtype=torch.int8).to(torch.float32)
        return (2 * signs - 1) / math.sqrt(p)

    def _project_tensor(self, index: int, name: str, flat: torch.Tensor) -> torch.Tensor:
        p, numel = self.dims[name], flat.shape[-1]
        out = flat.new_zeros(*flat.shape[:-1], p)
        for chunk, start in enumerate(range(0, numel, self.CHUNK_COLS)):
            cols = flat[..., start : start + self.CHUNK_COLS]
            out += cols @ self._chunk(index, chunk, cols.shape[-1], p).to(flat)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "chunk_cols": self.CHUNK_COLS}


def make_projector(cfg: JacobianConfig, named_shapes: dict[str, torch.Size]) -> Projector:
    """The projector of `cfg.projection` for parameter tensors `named_shapes` (in model order).

    `exact` gives the full Jacobian here, the same kernel as its layer factors: what callers that need Φ
    itself in memory (the in-memory estimate) can use; the jacobians stage stores factors instead
    (`sui_core.linearized.factors.make_store`). `khatri_rao` projects layer factors, so it needs the
    network, not only its shapes: `sui_core.linearized.factors.model_projector`."""
    check_seed(cfg.seed)
    if cfg.projection in ("none", "exact"):
        return IdentityProjector(named_shapes, cfg.dims_per_tensor, cfg.seed)
    if cfg.projection == "coordinates":
        return CoordinateProjector(named_shapes, cfg.dims_per_tensor, cfg.seed)
    if cfg.projection in ("gaussian", "rademacher"):
        return DenseProjector(named_shapes, cfg.dims_per_tensor, cfg.seed, cfg.projection)
    if cfg.projection == "khatri_rao":
        raise ValueError(
            "projection khatri_rao projects layer factors and needs the network: "
            "use sui_core.linearized.factors.model_projector(cfg, model, input_shape)"
        )
    raise ParamError("jacobian.projection", f"unknown value {cfg.projection!r}")


def check_seed(seed: int) -> None:
    """ParamError unless `seed` can seed the projection (SeedSequence takes non-negative integers)."""
    if seed < 0:
        raise ParamError("jacobian.seed", f"must be >= 0, got {seed}")


def jacobian_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Shapes of the tensors the Jacobian is taken against, in model order: the parameters with
    requires_grad (those frozen by `model.freeze` are constants of the linearization)."""
    return {name: p.shape for name, p in model.named_parameters() if p.requires_grad}


def per_sample_jacobians(
    model: torch.nn.Module, x: torch.Tensor, names: list[str] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Outputs f0 (B, k) and Jacobians {name: (B, k, *shape)} of the outputs w.r.t. the parameters at w0.

    Only parameters with requires_grad are differentiated (see `jacobian_shapes`), or only those in
    `names` (the others are then constants). The model is put in eval mode: the linearization is of the
    deterministic network (no dropout, batch norm on its running statistics), and one sample's Jacobian
    must not depend on the others in the batch (each sample is run alone under vmap).
    """
    model.eval()
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    wanted = list(trained) if names is None else names
    params = {name: trained[name] for name in wanted}
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in params}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def outputs(p: dict[str, torch.Tensor], xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (p, fixed, buffers), (xi.unsqueeze(0),)).reshape(-1)
        return out, out

    jac, f0 = vmap(jacrev(outputs, has_aux=True), in_dims=(None, 0))(params, x)
    return f0, jac


def shard_plan(n: int, shard_rows: int, batch_size: int, world: int = 1) -> list[list[tuple[int, int, int]]]:
    """Per rank, the shard files it writes: (file number, first sample, stop), in sample order.

    One process writes shards of `shard_rows` samples, each computed in batches of `batch_size` from
    the shard's start. With `world` processes those same batches are split into `world` contiguous
    runs of (nearly) equal count, one per rank, and a shard that straddles two ranks is cut in two
    there. Every sample is thus computed in the same batch as with one process (the same bytes of Φ
    and f0), and the files, numbered in sample order, hold the samples in order; with one process they
    are exactly the shards.
    """
    batches = [
        (lo, min(lo + batch_size, start + shard_rows, n))
        for start in range(0, n, shard_rows)
        for lo in range(start, min(start + shard_rows, n), batch_size)
    ]
    plan, number = [], 0
    for rank in range(world):
        share = contiguous_range(len(batches), rank, world)
        mine = batches[share.start : share.stop]
        pieces = []
        if mine:
            lo, hi = mine[0][0], mine[-1][1]
            cuts = [lo, *range((lo // shard_rows + 1) * shard_rows, hi, shard_rows), hi]
            for a, b in zip(cuts[:-1], cuts[1:]):
                pieces.append((number, a, b))
                number += 1
        plan.append(pieces)
    return plan


def input_batches(model: torch.nn.Module, x, start: int, stop: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The samples x[start:stop] a batch at a time, as tensors of the model's dtype on its device (the one
    loop behind `extract` and the in-memory estimate)."""
    ref = next(model.parameters())
    for lo in range(start, stop, batch_size):
        yield torch.as_tensor(x[lo : min(lo + batch_size, stop)], dtype=ref.dtype, device=ref.device)


def projected_batches(
    model: torch.nn.Module,
    x,
    projector: Projector,
    start: int,
    stop: int,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """f0 (b, k) float64 and projected Jacobians Φ (b, k, D) in `dtype` of the samples x[start:stop], a batch
    at a time."""
    for xb in input_batches(model, x, start, stop, batch_size):
        yield projector.jacobians(model, xb, dtype)


def extract(
    model: torch.nn.Module,
    x: np.ndarray,
    sample_id: np.ndarray,
    store,
    out_dir: str | Path,
    split: str,
    batch_size: int,
    shard_rows: int,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> list[dict[str, Any]]:
    """Write f0 and what `store` keeps of the samples `x` (n, ...) to shards `{split}-00000.parquet`, … in
    `out_dir`: a `Projector`'s Φ, or a `sui_core.linearized.factors.FactorLayout`'s factors (anything with
    `shard_columns(model, batch) -> {column: array}`, f0 among them).

    Runs on the device of the model's parameters. Only one shard's rows are held at a time; each shard is
    written atomically. Returns the manifest entries {file, rows, sha256}, in order.

    With `world` > 1 this is rank `rank`'s part (see `shard_plan`): it computes and writes only its
    own files; the entries of ranks 0, 1, … concatenated are the manifest's, in sample order.
    """
    if len(x) != len(sample_id):
        raise ValueError(f"{len(x)} samples but {len(sample_id)} sample ids")
    out_dir = Path(out_dir)
    entries = []
    pieces = shard_plan(len(x), shard_rows, batch_size, world)[rank]
    total = sum(stop - start for _, start, stop in pieces)
    with tqdm(total=total, desc=f"jacobians {split}", unit="sample", disable=not progress) as bar:
        for shard, start, stop in pieces:
            batches = []
            for xb in input_batches(model, x, start, stop, batch_size):
                batches.append(store.shard_columns(model, xb))
                bar.update(len(xb))
            columns = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
            path = out_dir / f"{split}-{shard:05d}.parquet"
            write_parquet(path, _shard_table(sample_id[start:stop], columns))
            entries.append({"file": path.name, "rows": stop - start, "sha256": file_sha256(path)})
    return entries


def _shard_table(sample_id: np.ndarray, columns: dict[str, np.ndarray]) -> pa.Table:
    """Rows of (n,) ids and per-sample arrays as list columns, each flattened row-major: f0 (n, k) as
    float64, every other column (phi (n, k, D), or layer factors) as float32."""
    n = len(sample_id)
    for a in columns.values():
        if a.size >= 2**31:
            raise ParamError(
                "jacobian.shard_rows",
                f"{n} rows of {a.size // n} values exceed a Parquet list column (2^31 values); lower shard_rows",
            )

    def lists(a: np.ndarray, dtype: pa.DataType) -> pa.Array:
        flat = a.reshape(n, -1)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * flat.shape[1])
        return pa.ListArray.from_arrays(offsets, pa.array(flat.ravel(), type=dtype))

    lists_of = {name: lists(a, _list_type(name)) for name, a in columns.items()}
    return pa.table({"sample_id": pa.array(np.asarray(sample_id, np.int64)), **lists_of})


def write_manifest(
    out_dir: str | Path,
    store,
    k: int,
    shards: dict[str, list[dict[str, Any]]],
    model_sha256: str,
    data_sha256: str,
) -> dict[str, Any]:
    """Write `manifest.json`: how the shards were made (`store.describe()`: projection or layer factors,
    layer map; D, k) and what each shard must hold."""
    manifest = {
        "projection": store.describe(),
        "D": store.total_dim,
        "k": k,
        "dtype": PHI_DTYPE,
        "shards": shards,
        "model_sha256": model_sha256,
        "data_sha256": data_sha256,
    }
    write_json(Path(out_dir) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    manifest = read_json(path)
    missing = [key for key in ("projection", "D", "k", "dtype", "shards") if key not in manifest]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    for split, entries in manifest["shards"].items():
        if any(not {"file", "rows", "sha256"} <= set(entry) for entry in entries):
            raise ArtifactError(f"{path}: a shard entry of split {split!r} lacks file, rows or sha256")
    return manifest


def column_shapes(manifest: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each list column of the manifest's shards: f0 (k,), and phi (k, D) or the
    columns an `exact` manifest lists (its materialized Jacobian columns and layer factors)."""
    k = manifest["k"]
    stored = manifest["projection"].get("columns", {"phi": [k, manifest["D"]]})
    return {"f0": (k,), **{name: tuple(shape) for name, shape in stored.items()}}


def iter_shard_columns(directory: str | Path, split: str) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (sample_id (b,), {column: (b, *shape) array}) per shard, each checked first against the
    manifest (sha256, column types, rows, list lengths): f0 float64, the other columns float32."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if split not in manifest["shards"]:
        raise ArtifactError(f"{directory / MANIFEST_NAME}: no split {split!r} (has {sorted(manifest['shards'])})")
    shapes, k, dim = column_shapes(manifest), manifest["k"], manifest["D"]
    for entry in manifest["shards"][split]:
        yield _read_shard(directory / entry["file"], entry, shapes, k, dim)


def iter_shards(directory: str | Path, split: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (sample_id (b,), f0 (b, k) float64, phi (b, k, D) float32) per shard of projected Jacobians,
    each checked first."""
    if read_manifest(directory)["projection"]["kind"] == "exact":
        raise ArtifactError(
            f"{Path(directory) / MANIFEST_NAME}: holds layer factors (projection exact), not Φ; "
            f"read it with sui_core.linearized.factors"
        )
    for ids, columns in iter_shard_columns(directory, split):
        yield ids, columns["f0"], columns["phi"]


def _read_shard(
    path: Path, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], k: int, dim: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if not path.is_file():
        raise ArtifactError(f"{path}: shard listed in {MANIFEST_NAME} is missing")
    sha = file_sha256(path)
    if sha != entry["sha256"]:
        raise ArtifactError(f"{path}: sha256 {sha[:12]}… does not match {MANIFEST_NAME} ({entry['sha256'][:12]}…)")
    table = read_parquet(path)
    types = {"sample_id": pa.int64(), **{name: pa.list_(_list_type(name)) for name in shapes}}
    for name, typ in types.items():
        got = _type_name(table.schema.field(name).type) if name in table.column_names else "missing"
        if got != _type_name(typ):
            raise ArtifactError(f"{path}: column {name!r} is {got}, expected {_type_name(typ)}")
    if table.num_rows != entry["rows"]:
        raise ArtifactError(f"{path}: {table.num_rows} rows, {MANIFEST_NAME} says {entry['rows']}")
    out = {}
    for name, shape in shapes.items():
        col = table.column(name).combine_chunks()
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if col.null_count or np.any(lengths != math.prod(shape)):
            raise ArtifactError(
                f"{path}: column {name!r} has list lengths {sorted(set(lengths.tolist()))}"
                f"{' and nulls' if col.null_count else ''}, expected {math.prod(shape)} "
                f"({list(shape)} a sample; k = {k}, D = {dim})"
            )
        out[name] = col.flatten().to_numpy().reshape(table.num_rows, *shape)
    return table.column("sample_id").to_numpy(), out


def _list_type(column: str) -> pa.DataType:
    """The item type of a shard's list column: f0 is float64, Φ and the layer factors float32."""
    return pa.float64() if column == "f0" else pa.float32()


def _type_name(typ: pa.DataType) -> str:
    """A type's name without the list item's field name, which Parquet writers spell differently."""
    return f"list<{typ.value_type}>" if pa.types.is_list(typ) else str(typ)


def outputs_at_w0(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The sample ids (n,) and network outputs f0 (n, k) at w0 of `split`, from its checked shards."""
    parts = list(iter_shard_columns(directory, split))
    return np.concatenate([ids for ids, _ in parts]), np.concatenate([columns["f0"] for _, columns in parts])


def load_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All shards of `split` concatenated: (sample_id (n,), f0 (n, k), phi (n, k, D))."""
    manifest = read_manifest(directory)
    k, dim = manifest["k"], manifest["D"]
    parts = list(iter_shards(directory, split))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, k)), np.zeros((0, k, dim), np.float32)
    return tuple(np.concatenate(a) for a in zip(*parts))
