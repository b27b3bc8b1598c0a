"""The exact empirical NTK from the network's layer structure: every coordinate, no full Jacobian.

A linear layer z = W a + b (`nn.Linear`; a ∈ R^{din}, z ∈ R^{dout}) enters the output f only through z,
so by the chain rule the per-sample Jacobian of output f_c w.r.t. W is an outer product and w.r.t. b
the backpropagated signal itself:

    ∂f_c/∂W = δ_c aᵀ,   ∂f_c/∂b = δ_c,   δ_c = ∂f_c/∂z ∈ R^{dout}.

The layer's block of the kernel Θ = J Jᵀ between (sample i, output c) and (sample j, output d) is then

    Θ_l[(i,c),(j,d)] = ⟨δ_ic a_iᵀ, δ_jd a_jᵀ⟩_F + ⟨δ_ic, δ_jd⟩ = (a_i·a_j + 1) (δ_ic·δ_jd).

When the layer sees several positions p per sample (a Linear on (B, T, din); `nn.Conv2d`, whose input
unfolds into one patch a_p ∈ R^{cin·kh·kw} per output pixel p, z_p = W a_p + b) the parameter is shared
over positions, so ∂f_c/∂W = Σ_p δ_cp a_pᵀ, ∂f_c/∂b = Σ_p δ_cp, and

    Θ_l[(i,c),(j,d)] = Σ_{p,q} (a_ip·a_jq + 1) (δ_icp·δ_jdq).

Appending a constant 1 to every a_p when the bias is trained (and keeping only that 1 when the weight is
frozen) makes this one formula, Σ_{p,q} (ã_ip·ã_jq)(δ_icp·δ_jdq). The full kernel is the sum of the
layers' blocks (the Jacobian's columns are the parameters, split by tensor). So it suffices to store per
sample a layer's factor pair (ã: positions × (din + 1), δ: k × positions × dout) instead of its
k × numel Jacobian block: for the MLP 784-1024-1, 2,835 numbers instead of 804,865.

a and δ come from one forward pass with hooks (each layer's input and output) and one
`autograd.grad` per output c of Σ_i f_ic w.r.t. the layer outputs: the network is in eval mode (batch
norm on its running statistics), so samples do not interact and ∂(Σ_i f_ic)/∂z_j = ∂f_jc/∂z_j.

A layer stores its factors only when they are smaller, positions·(|ã| + k·dout) < k·numel; else
its materialized per-sample Jacobian block Σ_p δ_cp ã_pᵀ (k × numel), whose kernel is a plain Gram
(a convolution over many pixels with few channels is smaller that way). Every other trained parameter
— batch-norm affine, embeddings, a Conv2d with groups ≠ 1, padding_mode other than zeros or padding
"same", a subclass of Linear/Conv2d, a layer called other than exactly once per forward (weight
sharing, found by counting hook calls) or whose input does not have the samples first, a parameter
held by two modules — gets its Jacobian columns from `torch.func.jacrev`
over those parameters alone (the others constant): a materialized block too. Frozen parameters
(requires_grad False, see `jacobians.jacobian_shapes`) get no columns. The one assumption left is that
a Linear/Conv2d's parameters are used only by its own forward (not also read elsewhere by hand).

Kernels are computed in float64 from whatever dtype the factors hold, in blocks of samples so that
memory stays bounded.

Where the n·k × n·k kernel does not fit, projection `khatri_rao` (`KhatriRaoProjector`) projects each
factor layer's Jacobian block from the same factors, never forming it. Write output c's block as the
matrix M_c = Σ_q δ_cq ã_qᵀ (dout × a_dim, q the positions: ∂f_c/∂W with ∂f_c/∂b as its last column;
its row-major vec is the parameters' order). Row s of the layer's projection P_l (p × dout·a_dim) is
(u_s ⊗ v_s)/√p, u_s ∈ R^{dout} and v_s ∈ R^{a_dim} independent standard Gaussian: P_l is the row-wise
Kronecker (Khatri–Rao, "face-splitting") product of U (p × dout) and V (p × a_dim), divided by √p, so

    (P_l vec M_c)_s = u_sᵀ M_c v_s / √p = Σ_q (u_s·δ_cq)(v_s·ã_q) / √p,

which costs per sample positions·p·(k·dout + a_dim) multiply-adds (and k·positions·p for the
products), not the k·dout·a_dim of M_c. E[(u⊗v)(u⊗v)ᵀ] = E[uuᵀ] ⊗ E[vvᵀ] = I, so E[P_lᵀP_l] = I and
the projected kernel ⟨P_l vec M_ic, P_l vec M_jd⟩ is an unbiased estimate of the layer's block
Θ_l[(i,c),(j,d)] = ⟨M_ic, M_jd⟩_F.

Why its variance falls like 1/p: the projected product is the mean over s of X_s = (u_sᵀ M v_s)(u_sᵀ M'
v_s), and the p rows are independent, so Var = Var(X)/p. Var(X) is finite (fourth moments of Gaussians)
and does not depend on p: for one position (M = δ ãᵀ, rank one) E[X] = (δ·δ')(ã·ã') and E[X²] =
(|δ|²|δ'|² + 2(δ·δ')²)(|ã|²|ã'|² + 2(ã·ã')²), so a diagonal entry has relative variance 8/p (a dense
Gaussian row: 2/p). The Kronecker sketch P_out ⊗ P_in with p_out·p_in = p rows draws only p_out + p_in
vectors: its rows are not independent, and on a rank-one block its product ⟨P_out δ, P_out δ'⟩·⟨P_in ã,
P_in ã'⟩ is two sketches of about √p rows each, whose variance falls like 1/√p only.

A block of at most p coordinates (dout·a_dim ≤ p) is kept whole (exact, Σ_q δ_cq ã_qᵀ). The
materialized tensors (layers stored as their Jacobian block, jacrev fallbacks) keep every column when
numel ≤ p, else get the Gaussian JL projection of `jacobians.DenseProjector` (p rows). Φ's columns are
the blocks in model order (a layer where its first parameter is); block b's U and V come from
`jacobians._generator(seed, b, 0)` and `(seed, b, 1)` (a materialized tensor's chunks from (seed, b,
chunk)): the same on every batch and run, unrelated across blocks. Over many positions the products
(B, k, positions, p) are formed CHUNK_VALUES numbers at a time (chunks of rows s).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sui_core.config import JacobianConfig
from sui_core.errors import ArtifactError, ParamError
from sui_core.linearized.jacobians import (
    DenseProjector,
    Projector,
    _generator,
    check_seed,
    iter_shard_columns,
    jacobian_shapes,
    make_projector,
    per_sample_jacobians,
    read_manifest,
)

KIND = "exact"  # the manifest's projection kind
KHATRI_RAO = "khatri_rao"  # projection of the factor layers by rank-one rows (u_s ⊗ v_s)/√p
FACTORS, JACOBIAN = "factors", "jacobian"  # how a layer is stored per sample
LAYER_TYPES = {nn.Linear: "linear", nn.Conv2d: "conv2d"}  # exact types: a subclass may compute otherwise
BLOCK_BYTES = 2**28  # float64 temporaries of one block of sample pairs in `kernel`
CHUNK_VALUES = 2**24  # numbers of one chunk of products (B, k + 1, positions, rows) in `KhatriRaoProjector`


@dataclass(frozen=True)
class FactorLayer:
    """A Linear or Conv2d whose Jacobian is built from its input and output signal."""

    module: str  # its name in model.named_modules()
    type: str  # linear | conv2d
    weight: str | None  # the weight's parameter name, None when frozen
    bias: str | None  # the bias's, None when frozen or absent
    positions: int  # p: rows of a Linear's input per sample (1 for (B, din)), output pixels of a Conv2d
    in_dim: int  # din: in_features, or cin·kh·kw
    out_dim: int  # dout: out_features, or cout
    stored: str  # FACTORS (ã and δ) or JACOBIAN (the k × numel block)

    @property
    def params(self) -> list[str]:
        return [name for name in (self.weight, self.bias) if name is not None]

    @property
    def a_dim(self) -> int:
        """Width of ã: din if the weight is trained, plus the constant 1 if the bias is."""
        return (self.in_dim if self.weight else 0) + (1 if self.bias else 0)

    @property
    def numel(self) -> int:
        return (self.out_dim * self.in_dim if self.weight else 0) + (self.out_dim if self.bias else 0)

    @classmethod
    def from_description(cls, entry: dict[str, Any]) -> FactorLayer:
        return cls(**{field.name: entry[field.name] for field in dataclasses.fields(cls)})


@dataclass
class Factors:
    """What one batch of samples stores: outputs at w0, the materialized Jacobian columns, and the
    factor pairs (ã (B, p, a_dim), δ (B, k, p, dout)) of the layers stored as factors."""

    f0: np.ndarray  # (B, k)
    phi: np.ndarray  # (B, k, Dm): the Jacobian blocks of the other trained parameters, in model order
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # module name -> (ã, δ)

    def __len__(self) -> int:
        return len(self.f0)

    @property
    def k(self) -> int:
        return self.f0.shape[1]

    def columns(self) -> dict[str, np.ndarray]:
        """The shard columns (see `FactorLayout.column_shapes`): f0, phi and `a:`/`delta:` per layer."""
        out = {"f0": self.f0, "phi": self.phi}
        for module, (a, delta) in self.pairs.items():
            out[f"a:{module}"], out[f"delta:{module}"] = a, delta
        return out

    @classmethod
    def concat(cls, parts: list[Factors]) -> Factors:
        return cls(
            np.concatenate([p.f0 for p in parts]),
            np.concatenate([p.phi for p in parts]),
            {m: tuple(np.concatenate([p.pairs[m][i] for p in parts]) for i in (0, 1)) for m in parts[0].pairs},
        )


@dataclass(frozen=True)
class FactorLayout:
    """Which trained parameters are stored how, for one network and input shape (`factor_layout`).

    Used like a `jacobians.Projector` by `jacobians.extract` and `write_manifest`: `shard_columns`,
    `describe`, `total_dim` (D = the number of trained parameters: no projection)."""

    k: int
    shapes: dict[str, tuple[int, ...]]  # every trained parameter, in model order
    layers: tuple[FactorLayer, ...]
    fallback: tuple[str, ...]  # trained parameters whose columns come from jacrev, in model order

    kind = KIND

    @property
    def total_dim(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def materialized(self) -> list[str]:
        """The parameters whose Jacobian columns are stored as such (phi), in model order."""
        names = set(self.fallback) | {p for layer in self.layers if layer.stored == JACOBIAN for p in layer.params}
        return [name for name in self.shapes if name in names]

    def column_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each stored column but f0."""
        shapes = {"phi": (self.k, sum(math.prod(self.shapes[n]) for n in self.materialized))}
        for layer in self.layers:
            if layer.stored == FACTORS:
                shapes[f"a:{layer.module}"] = (layer.positions, layer.a_dim)
                shapes[f"delta:{layer.module}"] = (self.k, layer.positions, layer.out_dim)
        return shapes

    def describe(self) -> dict[str, Any]:
        """The manifest's layer map: each layer and how it is stored, the columns of phi, every column's shape."""
        tensors, offset = [], 0
        for name in self.materialized:
            dim = math.prod(self.shapes[name])
            via = "jacrev" if name in self.fallback else "layer"
            tensors.append({"name": name, "shape": list(self.shapes[name]), "dim": dim, "offset": offset, "via": via})
            offset += dim
        return {
            "kind": KIND,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "tensors": tensors,
            "columns": {name: list(shape) for name, shape in self.column_shapes().items()},
            "D": self.total_dim,
        }

    def shard_columns(self, model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
        """f0 in float64 and every other column in float32 (as the shards store Φ) for the batch x."""
        columns = batch_factors(model, x, self).columns()
        return {name: a.astype(np.float64 if name == "f0" else np.float32) for name, a in columns.items()}


def _supported(module: nn.Module) -> bool:
    kind = LAYER_TYPES.get(type(module))
    if kind == "conv2d":
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return kind is not None


def factor_layout(model: nn.Module, input_shape) -> FactorLayout:
    """The layout of `model` for inputs of `input_shape` (without the batch dimension), found by one
    forward pass of two zero inputs on the model's device (the meta device works: only shapes and hook
    calls are looked at)."""
    model.eval()
    shapes = {name: tuple(shape) for name, shape in jacobian_shapes(model).items()}
    name_of = {id(p): name for name, p in model.named_parameters() if name in shapes}
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    candidates = {
        name: m
        for name, m in model.named_modules()
        if _supported(m)
        and any(id(p) in name_of for p in m.parameters(recurse=False))
        and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))
    }
    seen: dict[str, list[tuple[torch.Size, torch.Size]]] = {name: [] for name in candidates}

    def record(name: str):
        return lambda module, args, output: seen[name].append((args[0].shape, output.shape))

    hooks = [m.register_forward_hook(record(name)) for name, m in candidates.items()]
    ref = next(model.parameters())
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        for hook in hooks:
            hook.remove()
    k = out.reshape(2, -1).shape[1]
    layers = []
    for name, m in candidates.items():
        if len(seen[name]) != 1:  # never called, or called again (weight sharing): jacrev
            continue
        (in_shape, out_shape), kind = seen[name][0], LAYER_TYPES[type(m)]
        if in_shape[0] != 2 or out_shape[0] != 2 or (kind == "conv2d" and len(in_shape) != 4):
            continue  # the samples are not the first dimension here
        positions = math.prod(out_shape[1:-1]) if kind == "linear" else math.prod(out_shape[2:])
        in_dim = m.in_features if kind == "linear" else math.prod(m.weight.shape[1:])
        out_dim = m.out_features if kind == "linear" else m.out_channels
        weight = name_of.get(id(m.weight))
        bias = name_of.get(id(m.bias)) if m.bias is not None else None
        layer = FactorLayer(name, kind, weight, bias, positions, in_dim, out_dim, FACTORS)
        if positions * (layer.a_dim + k * out_dim) >= k * layer.numel:
            layer = FactorLayer(name, kind, weight, bias, positions, in_dim, out_dim, JACOBIAN)
        layers.append(layer)
    covered = {p for layer in layers for p in layer.params}
    return FactorLayout(k, shapes, tuple(layers), tuple(name for name in shapes if name not in covered))


def _layer_input(layer: FactorLayer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input per position, (B, p, din): a Linear's rows, a Conv2d's unfolded patches."""
    if layer.type == "linear":
        return x.reshape(len(x), layer.positions, layer.in_dim)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return patches.transpose(1, 2)


def _layer_signal(layer: FactorLayer, grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """∂(Σ_i f_ic)/∂z per position, (B, p, dout), from the gradient w.r.t. the layer output (None: unused)."""
    if grad is None:
        grad = torch.zeros_like(like)
    if layer.type == "conv2d":
        grad = grad.flatten(2).transpose(1, 2)
    return grad.reshape(len(grad), layer.positions, layer.out_dim)


def batch_factors(model: nn.Module, x: torch.Tensor, layout: FactorLayout) -> Factors:
    """f0, the materialized columns and the factor pairs of the samples x (B, ...), in the model's dtype,
    computed on its device (returned as numpy)."""

    def numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    f, phi, pairs = _factor_tensors(model, x, layout)
    return Factors(numpy(f), numpy(phi), {m: (numpy(a), numpy(d)) for m, (a, d) in pairs.items()})


def _factor_tensors(
    model: nn.Module, x: torch.Tensor, layout: FactorLayout
) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """`batch_factors` as tensors on the model's device: f0 (B, k), phi (B, k, Dm), {module: (ã, δ)}."""
    model.eval()
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def capture(layer: FactorLayer):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if layer.weight:
                inputs[layer.module] = _layer_input(layer, module, args[0].detach())
            outputs[layer.module] = output
            # later layers see a copy: an in-place op after this one (ReLU(inplace=True)) must not
            # change the tensor whose gradient is δ
            return output.clone()

        return hook

    hooks = [modules[layer.module].register_forward_hook(capture(layer)) for layer in layout.layers]
    try:
        with torch.enable_grad() if layout.layers else torch.no_grad():
            f = model(x).reshape(len(x), -1)
    finally:
        for hook in hooks:
            hook.remove()
    if f.shape[1] != layout.k:
        raise ValueError(f"the model gives {f.shape[1]} outputs, the layout {layout.k}")
    zs = [outputs[layer.module] for layer in layout.layers]
    with torch.enable_grad():  # also under a caller's no_grad (the in-memory estimate)
        per_output = [
            torch.autograd.grad(f[:, c].sum(), zs, retain_graph=c < layout.k - 1, allow_unused=True)
            for c in range(layout.k if zs else 0)
        ]
    blocks: dict[str, torch.Tensor] = {}
    pairs = {}
    for i, layer in enumerate(layout.layers):
        delta = torch.stack([_layer_signal(layer, grads[i], zs[i]) for grads in per_output], dim=1)  # (B, k, p, dout)
        a_in = inputs.get(layer.module)
        if layer.stored == FACTORS:
            ones = [delta.new_ones(len(x), layer.positions, 1)] if layer.bias else []  # ã = [a, 1]
            pairs[layer.module] = (torch.cat(([a_in] if layer.weight else []) + ones, dim=2), delta)
            continue
        if layer.weight:
            blocks[layer.weight] = torch.einsum("bcpo,bpi->bcoi", delta, a_in).flatten(2)
        if layer.bias:
            blocks[layer.bias] = delta.sum(dim=2)
    if layout.fallback:
        _, jac = per_sample_jacobians(model, x, names=list(layout.fallback))
        blocks.update({name: j.flatten(2) for name, j in jac.items()})
    phi = torch.cat([blocks[n] for n in layout.materialized], dim=2) if blocks else f.new_zeros(len(x), layout.k, 0)
    return f.detach(), phi, pairs


def make_store(cfg: JacobianConfig, model: nn.Module, input_shape) -> Projector | FactorLayout:
    """What the jacobians stage stores per sample for `cfg.projection`: layer factors for `exact`, else
    the projected Jacobian (`model_projector`)."""
    if cfg.projection == KIND:
        return factor_layout(model, input_shape)
    return model_projector(cfg, model, input_shape)


def model_projector(cfg: JacobianConfig, model: nn.Module, input_shape) -> Projector:
    """The `Projector` of `cfg.projection` for `model` on inputs of `input_shape`: `khatri_rao` from the
    model's layer factors, every other kind from its per-tensor Jacobians (`jacobians.make_projector`;
    `exact` is the full Jacobian there)."""
    if cfg.projection == KHATRI_RAO:
        return KhatriRaoProjector(factor_layout(model, input_shape), cfg.dims_per_tensor, cfg.seed)
    return make_projector(cfg, jacobian_shapes(model))


# ---- the Khatri–Rao projection ------------------------------------------------------------------


class KhatriRaoProjector(DenseProjector):
    """Φ from layer factors: p rank-one rows (u_s ⊗ v_s)/√p on each factor layer's block (weight and bias
    together), the Gaussian JL projection (or every column) on the materialized tensors (see the module doc).

    Its `shapes` are the blocks of Φ in model order: a factor layer as its matrix (dout, a_dim) under
    its module's name, a materialized tensor under its own; `project` takes the full Jacobian of those
    blocks (a layer's with the bias as last column), `jacobians` computes Φ from the layer factors."""

    def __init__(self, layout: FactorLayout, dims_per_tensor: int, seed: int):
        if dims_per_tensor < 1:
            raise ParamError("jacobian.dims_per_tensor", f"must be > 0, got {dims_per_tensor}")
        check_seed(seed)
        self.layout = layout
        owner = {p: layer for layer in layout.layers if layer.stored == FACTORS for p in layer.params}
        blocks: dict[str, torch.Size] = {}
        for name, shape in layout.shapes.items():
            layer = owner.get(name)
            if layer is None:
                blocks[name] = torch.Size(shape)
            elif layer.module not in blocks:
                blocks[layer.module] = torch.Size((layer.out_dim, layer.a_dim))
        super().__init__(blocks, dims_per_tensor, seed, KHATRI_RAO)
        self.factor_layers = {layer.module: layer for layer in owner.values()}
        # the factor layers projected by rows (the others are kept whole), and their U, V once drawn
        self.projected = [n for n in self.factor_layers if self.dims[n] < self.shapes[n].numel()]
        self._drawn: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (p × dout), V (p × a_dim)) of the projected factor layer `name`, standard Gaussian float32,
        drawn on first use from (seed, block index, 0) and (seed, block index, 1), then held."""
        if name not in self._drawn:
            index, (out_dim, a_dim), p = list(self.shapes).index(name), self.shapes[name], self.dims[name]
            self._drawn[name] = (
                torch.randn(p, out_dim, generator=_generator(self.seed, index, 0)),
                torch.randn(p, a_dim, generator=_generator(self.seed, index, 1)),
            )
        return self._drawn[name]

    def _chunk_rows(self, batch: int, positions: int) -> int:
        """Rows s per chunk of products (B, k + 1, positions, rows) for a batch of `batch` samples."""
        return max(1, CHUNK_VALUES // (batch * (self.layout.k + 1) * positions))

    def held_values(self, batch: int) -> int:
        """Numbers held besides a batch's factors and Φ for batches of `batch` samples: every U and V,
        and the largest chunk of products (at most CHUNK_VALUES, unless one row's alone exceeds it)."""
        rows = sum(self.dims[name] * sum(self.shapes[name]) for name in self.projected)
        chunks = [
            batch
            * (self.layout.k + 1)
            * layer.positions
            * min(self.dims[name], self._chunk_rows(batch, layer.positions))
            for name, layer in self.factor_layers.items()
            if name in self.projected
        ]
        return rows + max(chunks, default=0)

    def _project_tensor(self, index: int, name: str, flat: torch.Tensor) -> torch.Tensor:
        if name in self.projected:
            u, v = (t.to(flat) for t in self.rows(name))
            matrix = flat.reshape(*flat.shape[:-1], *self.shapes[name])  # (B, k, dout, a_dim)
            return ((matrix @ v.T) * u.T).sum(dim=-2) / math.sqrt(len(u))  # u_sᵀ M v_s / √p
        if self.dims[name] == flat.shape[-1]:
            return flat  # numel ≤ dims_per_tensor: every column
        return super()._project_tensor(index, name, flat)

    def _project_factors(self, name: str, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """(B, k, p) of a factor layer from ã (B, P, a_dim) and δ (B, k, P, dout): Σ_q (u_s·δ_cq)(v_s·ã_q)/√p,
        in chunks of rows s of at most CHUNK_VALUES products (B, k + 1, P, rows); a block kept whole:
        Σ_q δ_cq ã_qᵀ flattened."""
        if name not in self.projected:
            return torch.einsum("bcqo,bqi->bcoi", delta, a).flatten(2)
        u, v = (t.to(a) for t in self.rows(name))
        (batch, k, positions, _), p = delta.shape, len(u)
        step = min(p, self._chunk_rows(batch, positions))
        out = a.new_empty(batch, k, p)
        for lo in range(0, p, step):
            du = delta @ u[lo : lo + step].T  # (B, k, P, rows)
            av = a @ v[lo : lo + step].T  # (B, P, rows)
            out[..., lo : lo + step] = du.mul_(av.unsqueeze(1)).sum(dim=2)
        return out / math.sqrt(p)

    def jacobians(
        self, model: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[np.ndarray, np.ndarray]:
        """f0 (B, k) float64 and Φ (B, k, D) in `dtype` of the batch x, from its layer factors
        (`batch_factors`): the rank-one rows of each factor layer, the projected columns of the
        materialized tensors."""
        f0, materialized, pairs = _factor_tensors(model, x, self.layout)  # on the model's device: projected there
        widths = [math.prod(self.layout.shapes[name]) for name in self.layout.materialized]
        columns = dict(zip(self.layout.materialized, torch.split(materialized, widths, dim=2)))
        blocks = []
        for index, name in enumerate(self.shapes):
            if name in self.factor_layers:
                blocks.append(self._project_factors(name, *pairs[name]))
            else:
                blocks.append(self._project_tensor(index, name, columns[name]))
        phi = torch.cat(blocks, dim=2).to(dtype)
        return f0.to(torch.float64).cpu().numpy(), phi.cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """The projectors' record (kind, seed, dims_per_tensor, D, each block's offset and dim), with
        per block how it is projected: a factor layer's module, parameters, positions and whether its
        rows are rank-one (khatri_rao) or the block is whole; a materialized tensor's source (layer or
        jacrev) and whether it is kept whole or Gaussian."""
        description = super().describe()
        for entry in description["tensors"]:
            name = entry["name"]
            if name in self.factor_layers:
                layer = self.factor_layers[name]
                projection = KHATRI_RAO if name in self.projected else "whole"
                entry.update(projection=projection, via="factors", params=layer.params, positions=layer.positions)
            else:
                kept = self.dims[name] == math.prod(self.shapes[name])
                via = "jacrev" if name in self.layout.fallback else "layer"
                entry.update(projection="whole" if kept else "gaussian", via=via)
        return description


# ---- kernels -------------------------------------------------------------------------------------


def _blocks(n: int, rows: int) -> list[slice]:
    return [slice(lo, min(lo + rows, n)) for lo in range(0, n, rows)]


def _rows_per_block(row_bytes: int, pair_bytes: int, block_bytes: int) -> int:
    """Samples per block so that two blocks' inputs (row_bytes a sample) and the temporaries of their
    pairs (pair_bytes a pair) each stay within block_bytes."""
    rows = math.isqrt(max(1, block_bytes // max(pair_bytes, 1)))
    if row_bytes:
        rows = min(rows, block_bytes // (2 * row_bytes))
    return max(1, rows)


def _f64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)  # a copy: shard arrays are read-only views of Arrow buffers


def _pair_kernel(a1: torch.Tensor, d1: torch.Tensor, a2: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """Σ_{p,q} (ã_ip·ã_jq)(δ_icp·δ_jdq) as (B1·k, B2·k): two GEMMs (over a_dim, over dout) and a
    weighted sum over the position pairs."""
    (b1, k, p, dout), b2, q = d1.shape, len(d2), d2.shape[2]
    aa = (a1.reshape(b1 * p, -1) @ a2.reshape(b2 * q, -1).T).reshape(b1, 1, p, b2, 1, q)
    dd = (d1.reshape(b1 * k * p, dout) @ d2.reshape(b2 * k * q, dout).T).reshape(b1, k, p, b2, k, q)
    return (dd * aa).sum(dim=(2, 5)).reshape(b1 * k, b2 * k)


def kernel(f1: Factors, f2: Factors, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Θ(f1's samples, f2's samples) as (B1·k, B2·k) float64, rows (i, c) and columns (j, d) sample-major,
    summed over layers: the Gram of the materialized columns plus each factor layer's block. Passing the
    same Factors twice computes each pair of sample blocks once (the kernel is symmetric)."""
    k, n1, n2 = f1.k, len(f1), len(f2)
    out = torch.zeros(n1 * k, n2 * k, dtype=torch.float64)
    symmetric = f1 is f2

    def accumulate(rows: int, block) -> None:
        for i in _blocks(n1, rows):
            for j in _blocks(n2, rows):
                if symmetric and j.start < i.start:
                    continue
                value = block(i, j)
                out[i.start * k : i.stop * k, j.start * k : j.stop * k] += value
                if symmetric and j.start != i.start:
                    out[j.start * k : j.stop * k, i.start * k : i.stop * k] += value.T

    width = f1.phi.shape[2]
    if width:
        rows = _rows_per_block(8 * k * width, 8 * k * k, block_bytes)
        accumulate(rows, lambda i, j: _f64(f1.phi[i]).reshape(-1, width) @ _f64(f2.phi[j]).reshape(-1, width).T)
    for module, (a1, d1) in f1.pairs.items():
        a2, d2 = f2.pairs[module]
        p = a1.shape[1]
        rows = _rows_per_block(8 * (a1[0].size + d1[0].size), 8 * (p * p * (2 * k * k + 1) + k * k), block_bytes)
        accumulate(rows, lambda i, j: _pair_kernel(_f64(a1[i]), _f64(d1[i]), _f64(a2[j]), _f64(d2[j])))
    return out.numpy()


# ---- shards --------------------------------------------------------------------------------------


def values_per_sample(description: dict[str, Any]) -> int:
    """How many numbers a sample's stored columns hold besides f0, from a manifest's `projection`."""
    return sum(math.prod(shape) for shape in description["columns"].values())


def iter_factor_shards(directory: str | Path, split: str) -> Iterator[tuple[np.ndarray, Factors]]:
    """Yield (sample_id (b,), Factors of those samples) per shard of an `exact` manifest, each checked."""
    description = read_manifest(directory)["projection"]
    if description["kind"] != KIND:
        raise ArtifactError(
            f"{Path(directory)}: holds projected Jacobians (projection {description['kind']}), not layer factors"
        )
    factor_layers = [FactorLayer.from_description(e) for e in description["layers"] if e["stored"] == FACTORS]
    for ids, cols in iter_shard_columns(directory, split):
        pairs = {layer.module: (cols[f"a:{layer.module}"], cols[f"delta:{layer.module}"]) for layer in factor_layers}
        yield ids, Factors(cols["f0"], cols["phi"], pairs)


def load_factors(directory: str | Path, split: str) -> tuple[np.ndarray, Factors]:
    """All shards of `split` of an `exact` manifest: (sample_id (n,), Factors of the n samples)."""
    parts = list(iter_factor_shards(directory, split))
    if not parts:
        raise ArtifactError(f"{Path(directory)}: no samples in split {split!r}")
    return np.concatenate([ids for ids, _ in parts]), Factors.concat([f for _, f in parts])
