"""Fused interspace-pruning (IP) inference ops: a convolution whose kernel is stored as sparse coefficients.

Storage
-------
For a convolution weight ``W`` of shape ``weight_shape = (w0, w1, k_1, ..., k_d)`` let ``K = k_1 * ... * k_d``.
The kernel is kept as a coefficient tensor ``C`` of shape ``(w0, w1, K)`` and a basis ``B`` of shape ``(K, K)``
(row ``j`` is the basis filter ``F_j`` flattened in C order; ``None`` means the identity, the spatial basis):

    W = reshape(C @ B, weight_shape)

``C`` is stored sparsely: ``values`` (nnz,) and ``indices`` (nnz,) int32/int64, flat indices into
``C.reshape(-1)``. Repeated indices are summed (``C.view(-1).index_add_(0, indices, values)``).

* ordinary conv: ``weight_shape = (c_out, c_in/groups, *k)``, so ``C[o, il, j]`` couples output channel ``o``
  with input channel ``i = (o // (c_out/groups)) * (c_in/groups) + il``;
* transposed conv: ``weight_shape = (c_in, c_out/groups, *k)``, so ``C[i, ol, j]`` couples input channel ``i``
  with output channel ``o = (i // (c_in/groups)) * (c_out/groups) + ol``.

The algebra
-----------
Convolution (and transposed convolution) is bilinear in input and kernel, and ``W[a, b] = sum_j C[a, b, j] F_j``,
so with ``conv`` standing for either of the two (same stride/padding/dilation/output_padding):

    y[o] = sum_i sum_j M[o, i, j] conv(x[i], F_j)          (M[o, i, j] = C entry coupling o and i, else 0)
         = sum_j conv( sum_i M[o, i, j] x[i], F_j )

which gives two evaluation orders, neither of which materialises ``W``:

(a) *basis first*: convolve every input channel with the ``K`` basis filters (one grouped conv,
    groups = c_in), giving ``c_in*K`` maps at output resolution, then contract
    them with the sparse ``(c_out, c_in*K)`` matrix ``A[o, i*K + j] = M[o, i, j]`` (block-diagonal over groups).
(b) *coefficients first*: contract the input with the sparse ``(c_out*K, c_in)`` matrix
    ``Bm[o*K + j, i] = M[o, i, j]`` into ``c_out*K`` maps at input resolution, then apply the ``K`` basis
    filters to each output channel's ``K`` maps and sum over ``j`` (one grouped conv, groups = c_out).

Both sparse matrices are built per call from ``indices`` in O(nnz) memory (a COO tensor); the dense
block-diagonal matrix is never formed. Cost model used by ``order=0`` (multiply-accumulates per sample,
``P_in``/``P_out`` = number of input/output spatial positions, ``nnz`` = stored coefficients; groups only
enter through ``nnz <= c_out * c_in/groups * K``):

    ordinary conv:   (a) c_in*K*K*P_out + nnz*P_out        (b) nnz*P_in + c_out*K*K*P_out
    transposed conv: (a) c_in*K*K*P_in  + nnz*P_out        (b) nnz*P_in + c_out*K*K*P_in

(a transposed conv does ``K`` MACs per *input* position and filter). With the identity basis, order (a) of an
ordinary 1-d/2-d conv is an im2col (``F.unfold``), a copy, so its basis term is ``c_in*K*P_out`` instead.
The cheaper order is taken; ties go to (a).

The ops are inference-only: they have no autograd formula (backward raises a clear error).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import IPFXTypeError, IPFXValueError

__all__ = [
    "ORDER_AUTO",
    "ORDER_BASIS_FIRST",
    "ORDER_COEFF_FIRST",
    "ORDER_DENSE",
    "ip_conv",
    "sparse_linear",
    "choose_order",
    "sparse_coefficients",
    "SparseIPConv",
    "SparseLinear",
]

#: ``order`` argument of :func:`ip_conv`.
ORDER_AUTO = 0
ORDER_BASIS_FIRST = 1
ORDER_COEFF_FIRST = 2
ORDER_DENSE = 3  # W rebuilt once from the sparse storage and cached; a plain dense convolution

_INT32_MAX = 2**31 - 1

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

IntSeq = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------
# argument checking (shape-only checks run in the fake kernel too; data checks only in the real kernel)
# ----------------------------------------------------------------------------------------------------------


def _per_dim(name: str, value: Sequence[int], d: int) -> list[int]:
    """Expand a length-1 list to ``d`` entries and check the length is ``d``."""
    value = [int(v) for v in value]
    if len(value) == 1 and d > 1:
        value = value * d
    if len(value) != d:
        raise IPFXValueError(f"{name} must have {d} entries (one per spatial dim), got {value}")
    return value


def _check_sparse_storage(values: Tensor, indices: Tensor) -> None:
    if values.dim() != 1 or indices.dim() != 1:
        raise IPFXValueError(
            f"values and indices must be 1-d, got shapes {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if values.shape[0] != indices.shape[0]:
        raise IPFXValueError(
            f"values and indices must have the same length, got {values.shape[0]} values "
            f"and {indices.shape[0]} indices"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise IPFXTypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if not values.is_floating_point():
        raise IPFXTypeError(f"values must be a floating point tensor, got {values.dtype}")


def _check_index_range(indices: Tensor, numel: int) -> None:
    """Data check (real kernel only): every flat index lies in ``[0, numel)``."""
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= numel:
        raise IPFXValueError(
            f"indices out of range: flat indices must lie in [0, {numel}) for the coefficient tensor, "
            f"got min {lo}, max {hi}"
        )


def _conv_geometry(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    basis: Optional[Tensor],
    bias: Optional[Tensor],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    transposed: bool,
    output_padding: Sequence[int],
) -> dict:
    """Check the (shape-only) arguments of ``ip_conv``; return the normalised geometry."""
    weight_shape = [int(s) for s in weight_shape]
    if not 3 <= len(weight_shape) <= 5:
        raise IPFXValueError(
            f"weight_shape must be (w0, w1, *kernel) with 1 to 3 kernel dims, got {weight_shape}"
        )
    if any(s <= 0 for s in weight_shape):
        raise IPFXValueError(f"weight_shape entries must be positive, got {weight_shape}")
    d = len(weight_shape) - 2
    kernel = weight_shape[2:]
    K = math.prod(kernel)
    groups = int(groups)
    if groups <= 0:
        raise IPFXValueError(f"groups must be positive, got {groups}")
    stride = _per_dim("stride", stride, d)
    padding = _per_dim("padding", padding, d)
    dilation = _per_dim("dilation", dilation, d)
    output_padding = _per_dim("output_padding", output_padding, d) if len(output_padding) else [0] * d
    if any(s <= 0 for s in stride) or any(s <= 0 for s in dilation):
        raise IPFXValueError(f"stride and dilation must be positive, got {stride} and {dilation}")
    if any(p < 0 for p in padding):
        raise IPFXValueError(f"padding must be non-negative ints (zeros padding), got {padding}")
    if not transposed and any(output_padding):
        raise IPFXValueError(f"output_padding {output_padding} is only valid for a transposed conv")
    if x.dim() not in (d + 1, d + 2):
        raise IPFXValueError(
            f"a {d}-d conv expects input of shape (N, C, *spatial) with {d} spatial dims, "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise IPFXTypeError(f"x must be a floating point tensor, got {x.dtype}")
    c_in = x.shape[1] if x.dim() == d + 2 else x.shape[0]
    if transposed:
        if weight_shape[0] != c_in:
            raise IPFXValueError(
                f"transposed conv: weight_shape[0] ({weight_shape[0]}) must equal the input channels ({c_in})"
            )
        if c_in % groups:
            raise IPFXValueError(f"input channels ({c_in}) must be divisible by groups ({groups})")
        c_out = weight_shape[1] * groups
    else:
        c_out = weight_shape[0]
        if weight_shape[1] * groups != c_in:
            raise IPFXValueError(
                f"weight_shape[1] * groups ({weight_shape[1]} * {groups}) must equal the input channels ({c_in})"
            )
        if c_out % groups:
            raise IPFXValueError(f"output channels ({c_out}) must be divisible by groups ({groups})")
    _check_sparse_storage(values, indices)
    if basis is not None and tuple(basis.shape) != (K, K):
        raise IPFXValueError(
            f"basis must have shape (K, K) = ({K}, {K}) for kernel {tuple(kernel)}, got {tuple(basis.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise IPFXValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    return dict(
        d=d,
        kernel=kernel,
        K=K,
        c_in=c_in,
        c_out=c_out,
        groups=groups,
        weight_shape=weight_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        output_padding=output_padding,
        transposed=bool(transposed),
    )


def _output_spatial(g: dict, in_spatial: Sequence[int]) -> list[int]:
    """Output spatial size of the conv (PyTorch's formulas)."""
    out = []
    for n, k, s, p, dl, op in zip(
        in_spatial, g["kernel"], g["stride"], g["padding"], g["dilation"], g["output_padding"]
    ):
        if g["transposed"]:
            out.append((n - 1) * s - 2 * p + dl * (k - 1) + op + 1)
        else:
            out.append((n + 2 * p - dl * (k - 1) - 1) // s + 1)
    return out


# ----------------------------------------------------------------------------------------------------------
# order selection
# ----------------------------------------------------------------------------------------------------------


def _identity_unfold_applies(g: dict, identity_basis: bool) -> bool:
    return identity_basis and not g["transposed"] and g["d"] <= 2


def choose_order(
    *,
    c_in: int,
    c_out: int,
    K: int,
    nnz: int,
    p_in: int,
    p_out: int,
    transposed: bool,
    cheap_identity: bool = False,
) -> int:
    """Pick the cheaper evaluation order by multiply-accumulate count (per sample).

    ordinary conv:   (a) c_in*K*K*P_out + nnz*P_out       (b) nnz*P_in + c_out*K*K*P_out
    transposed conv: (a) c_in*K*K*P_in  + nnz*P_out       (b) nnz*P_in + c_out*K*K*P_in

    ``cheap_identity``: order (a)'s basis stage is an im2col copy (identity basis, ordinary 1-d/2-d conv),
    costing ``c_in*K*P_out``. Returns ``ORDER_BASIS_FIRST`` (1) or ``ORDER_COEFF_FIRST`` (2); ties go to (a).
    """
    basis_positions = p_in if transposed else p_out
    basis_a = c_in * K * (1 if cheap_identity else K) * basis_positions
    cost_a = basis_a + nnz * p_out
    cost_b = nnz * p_in + c_out * K * K * basis_positions
    return ORDER_BASIS_FIRST if cost_a <= cost_b else ORDER_COEFF_FIRST


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


def _coupling(g: dict, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Map flat indices into C = (w0, w1, K) to (output channel o, input channel i, basis index j)."""
    K = g["K"]
    w1 = g["weight_shape"][1]
    j = flat % K
    r = flat // K
    a, b = r // w1, r % w1
    if g["transposed"]:  # C[i, ol, j]
        cin_g = g["c_in"] // g["groups"]
        i = a
        o = (a // cin_g) * w1 + b
    else:  # C[o, il, j]
        cout_g = g["c_out"] // g["groups"]
        o = a
        i = (a // cout_g) * w1 + b
    return o, i, j


# Sparse matrices built from (values, indices), cached per storage tensor: a deployed module calls the op
# with the same buffers every time, so the matrix is built (and its format converted) once, not per call.
# Keyed weakly on the ``indices`` tensor; the entry also records the identity and version counters of both
# tensors, so an in-place change or a different ``values`` tensor rebuilds it.
_MATRICES: dict[int, tuple["weakref.ref[Tensor]", dict]] = {}  # id(indices) -> (weak ref, matrices)


def _storage_entry(indices: Tensor) -> dict:
    """The cache dict of one sparse storage (keyed weakly on its ``indices`` tensor)."""
    ref, entry = _MATRICES.get(id(indices), (None, None))
    if ref is None or ref() is not indices:  # new storage, or an old id reused by another tensor
        entry = {}
        try:
            _MATRICES[id(indices)] = (weakref.ref(indices), entry)
            weakref.finalize(indices, _MATRICES.pop, id(indices), None)
        except TypeError:  # cannot be weakly referenced (some tensor subclasses): no caching
            pass
    return entry


def _cached(entry: dict, which: str, key: tuple, build):
    """``entry[which]`` if it was built for ``key``, else ``build()`` (replacing the stale one)."""
    hit = entry.get(which)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    entry[which] = (key, value)
    return value


def _sparse_matrix(values: Tensor, indices: Tensor, which: str, shape: tuple[int, int], coords, like: Tensor) -> Tensor:
    """The sparse ``shape`` matrix with ``values`` at ``coords() = (rows, cols)`` (duplicates summed).

    CSR where torch has a CSR @ dense kernel for the dtype and device (measured 1.5-5x faster than COO on
    CPU for ResNet-sized layers), else coalesced COO.
    """

    def build():
        rows, cols = coords()
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values.to(dtype=like.dtype, device=like.device),
                                      shape, check_invariants=False).coalesce()
        if like.dtype in (torch.float32, torch.float64) or like.device.type == "cuda":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                return coo.to_sparse_csr()
        return coo

    key = (shape, id(values), values._version, indices._version, like.dtype, like.device)
    return _cached(_storage_entry(indices), which, key, build)


def _spmm(matrix: Tensor, dense: Tensor) -> Tensor:
    """``S @ dense`` for a sparse matrix from :func:`_sparse_matrix`."""
    nnz = matrix._nnz() if matrix.layout == torch.sparse_coo else matrix.values().numel()
    if nnz == 0:
        return dense.new_zeros(matrix.shape[0], dense.shape[1])
    return torch.sparse.mm(matrix, dense) if matrix.layout == torch.sparse_coo else matrix @ dense


def _basis_or_identity(basis: Optional[Tensor], K: int, like: Tensor) -> Tensor:
    if basis is None:
        return torch.eye(K, dtype=like.dtype, device=like.device)
    return basis.to(dtype=like.dtype, device=like.device)


def _filter_bank(basis: Optional[Tensor], K: int, channels: int, kernel, like: Tensor) -> Tensor:
    """The K basis filters repeated for every channel, (channels*K, 1, *k): row c*K + j is F_j.

    Costs channels*K*K numbers (not a weight-sized tensor); it lets one grouped conv apply the bank to
    every channel, which is faster than folding the channels into the batch.
    """
    filters = _basis_or_identity(basis, K, like).reshape(1, K, *kernel)
    return filters.expand(channels, K, *kernel).reshape(channels * K, 1, *kernel)


def _conv_kwargs(g: dict) -> dict:
    kw = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"])
    if g["transposed"]:
        kw["output_padding"] = g["output_padding"]
    return kw


def _basis_maps(g: dict, x: Tensor, basis: Optional[Tensor]) -> Tensor:
    """Order (a), stage 1: ``conv(x[n, i], F_j)`` for all n, i, j as a (N, c_in*K, P_out) tensor.

    One grouped conv with groups = c_in and the filter bank repeated per channel: group i maps input
    channel i to channels i*K + j (ordinary conv weight (c_in*K, 1, *k), transposed conv weight
    (c_in, K, *k)). With the identity basis and an ordinary 1-d/2-d conv this is ``F.unfold`` (im2col), whose channel
    order ``i*K + j`` (kernel flattened in C order) is the same.
    """
    n, c_in = x.shape[:2]
    d, K, kernel = g["d"], g["K"], g["kernel"]
    if _identity_unfold_applies(g, basis is None):
        if d == 1:
            cols = F.unfold(
                x.unsqueeze(2),
                kernel_size=(1, kernel[0]),
                dilation=(1, g["dilation"][0]),
                padding=(0, g["padding"][0]),
                stride=(1, g["stride"][0]),
            )
        else:
            cols = F.unfold(x, kernel, dilation=g["dilation"], padding=g["padding"], stride=g["stride"])
        return cols
    bank = _filter_bank(basis, K, c_in, kernel, x)  # (c_in*K, 1, *k): F_j for every channel
    if g["transposed"]:  # convT weight (in, out/groups, *k) = (c_in, K, *k)
        maps = _CONV_T[d](x, bank.reshape(c_in, K, *kernel), groups=c_in, **_conv_kwargs(g))
    else:
        maps = _CONV[d](x, bank, groups=c_in, **_conv_kwargs(g))
    return maps.reshape(n, c_in * K, -1)


def _order_a(g: dict, x: Tensor, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], out_spatial) -> Tensor:
    """(a): y[n, o] = sum_{i,j} A[o, i*K + j] conv(x[n, i], F_j), A sparse (c_out, c_in*K)."""
    n = x.shape[0]
    K, c_in, c_out = g["K"], g["c_in"], g["c_out"]
    maps = _basis_maps(g, x, basis)  # (N, c_in*K, P_out)
    p_out = maps.shape[-1]
    rhs = maps.transpose(0, 1).reshape(c_in * K, n * p_out)

    def coords():
        o, i, j = _coupling(g, flat())
        return o, i * K + j

    y = _spmm(_sparse_matrix(values, indices, "a", (c_out, c_in * K), coords, rhs), rhs)  # (c_out, N*P_out)
    return y.reshape(c_out, n, p_out).transpose(0, 1).reshape(n, c_out, *out_spatial)


def _order_b(g: dict, x: Tensor, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], out_spatial) -> Tensor:
    """(b): z[n, o*K + j] = sum_i Bm[o*K + j, i] x[n, i];  y[n, o] = sum_j conv(z[n, o*K + j], F_j)."""
    n = x.shape[0]
    d, K, kernel, c_in, c_out = g["d"], g["K"], g["kernel"], g["c_in"], g["c_out"]
    in_spatial = x.shape[2:]
    rhs = x.transpose(0, 1).reshape(c_in, -1)  # (c_in, N*P_in)

    def coords():
        o, i, j = _coupling(g, flat())
        return o * K + j, i

    z = _spmm(_sparse_matrix(values, indices, "b", (c_out * K, c_in), coords, rhs), rhs)  # (c_out*K, N*P_in)
    z = z.reshape(c_out * K, n, *in_spatial).transpose(0, 1).reshape(n, c_out * K, *in_spatial)
    bank = _filter_bank(basis, K, c_out, kernel, x)  # (c_out*K, 1, *k)
    if g["transposed"]:  # convT weight (in, out/groups, *k) = (c_out*K, 1, *k)
        y = _CONV_T[d](z, bank, groups=c_out, **_conv_kwargs(g))
    else:  # conv weight (out, in/groups, *k) = (c_out, K, *k)
        y = _CONV[d](z, bank.reshape(c_out, K, *kernel), groups=c_out, **_conv_kwargs(g))
    return y.reshape(n, c_out, *out_spatial)


def _order_dense(g: dict, x: Tensor, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], out_spatial) -> Tensor:
    """W = reshape(C @ basis, weight_shape) rebuilt once per storage (cached), then one dense convolution.

    Storage stays sparse (what is saved and shipped); this trades run-time memory for the speed of the
    dense kernels where the sparse orders are slower (measured, see :func:`_measured_order`).
    """

    def build():
        w0, w1 = g["weight_shape"][:2]
        c = _densify(values.to(x.dtype), flat(), w0 * w1 * g["K"]).reshape(w0, w1, g["K"])
        if basis is not None:
            c = c @ basis.to(dtype=x.dtype, device=x.device)
        return c.reshape(g["weight_shape"])

    key = (id(values), values._version, indices._version, None if basis is None else (id(basis), basis._version),
           x.dtype, x.device)
    weight = _cached(_storage_entry(indices), "dense", key, build)
    if g["transposed"]:
        return _CONV_T[g["d"]](x, weight, None, g["stride"], g["padding"], g["output_padding"], g["groups"],
                               g["dilation"])
    return _CONV[g["d"]](x, weight, None, g["stride"], g["padding"], g["dilation"], g["groups"])


_RUNNERS = {ORDER_BASIS_FIRST: _order_a, ORDER_COEFF_FIRST: _order_b, ORDER_DENSE: _order_dense}


def _candidates(g: dict, x: Tensor, values: Tensor, basis, out_spatial) -> dict:
    """The orders worth timing: a sparse order is skipped when its multiply-accumulates exceed 4x the dense
    conv's or its intermediate maps exceed 16x the input plus output (a 7x7 stride-2 stem in order (b)
    would need c_out*49 maps at input resolution: gigabytes at batch 32)."""
    p_in, p_out = math.prod(x.shape[2:]), math.prod(out_spatial)
    c_in, c_out, K, nnz = g["c_in"], g["c_out"], g["K"], values.numel()
    positions = p_in if g["transposed"] else p_out
    dense_macs = c_out * (c_in // g["groups"]) * K * (p_in if g["transposed"] else p_out)
    identity = _identity_unfold_applies(g, basis is None)
    macs = {ORDER_BASIS_FIRST: c_in * K * (1 if identity else K) * positions + nnz * p_out,
            ORDER_COEFF_FIRST: nnz * p_in + c_out * K * K * positions}
    maps = {ORDER_BASIS_FIRST: c_in * K * positions, ORDER_COEFF_FIRST: c_out * K * p_in}
    budget = 16 * (c_in * p_in + c_out * p_out)
    chosen = {ORDER_DENSE: _RUNNERS[ORDER_DENSE]}
    for order in (ORDER_BASIS_FIRST, ORDER_COEFF_FIRST):
        if macs[order] <= 4 * dense_macs and maps[order] <= budget:
            chosen[order] = _RUNNERS[order]
    return chosen


def _measured_order(g: dict, x: Tensor, values, indices, flat, basis, out_spatial) -> int:
    """The fastest of the three evaluation orders for this storage and input shape, timed once.

    The first call with a new input shape runs every candidate order twice (a warm-up that builds its
    sparse matrix or dense weight, then a timed run; see :func:`_candidates`) and remembers the winner;
    later calls go straight to it.
    Without a cache (storage that cannot be weakly referenced) the MAC-count rule of :func:`choose_order`
    decides between the two sparse orders.
    """
    entry = _storage_entry(indices)
    key = (tuple(x.shape), x.dtype, x.device, id(values), values._version, indices._version)
    hit = entry.get("order")
    if hit is not None and hit[0] == key:
        return hit[1]
    ref = _MATRICES.get(id(indices), (None, None))[0]
    if ref is None or ref() is not indices:  # nowhere to remember a measurement: estimate instead
        return choose_order(c_in=g["c_in"], c_out=g["c_out"], K=g["K"], nnz=values.numel(),
                            p_in=math.prod(x.shape[2:]), p_out=math.prod(out_spatial), transposed=g["transposed"],
                            cheap_identity=_identity_unfold_applies(g, basis is None))
    timings = {}
    for order, run in _candidates(g, x, values, basis, out_spatial).items():
        run(g, x, values, indices, flat, basis, out_spatial)
        start = time.perf_counter()
        run(g, x, values, indices, flat, basis, out_spatial)
        timings[order] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    entry["order"] = (key, best)
    return best


# ----------------------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------------------

_INFERENCE_ONLY = (
    "{op} is an inference-only op (it has no autograd formula). Train with the dense/reparametrised "
    "model, or run this module under torch.no_grad()/torch.inference_mode()."
)


@torch.library.custom_op("ipfx::ip_conv", mutates_args=())
def ip_conv(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    basis: Optional[Tensor],
    bias: Optional[Tensor],
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    transposed: bool,
    output_padding: list[int],
    order: int,
) -> Tensor:
    """Convolution with kernel ``W = reshape(C @ basis, weight_shape)``, ``C`` given sparsely, computed by linearity.

    Equals ``F.conv{d}d(x, W, bias, stride, padding, dilation, groups)`` (``transposed=False``,
    ``W: (c_out, c_in/groups, *k)``) or ``F.conv_transpose{d}d(x, W, bias, stride, padding, output_padding,
    groups, dilation)`` (``transposed=True``, ``W: (c_in, c_out/groups, *k)``) without ever forming ``W``.

    ``values``/``indices``: nonzeros of ``C`` (shape ``(w0, w1, K)``) and their flat indices (int32/int64;
    repeats are summed). ``basis``: ``(K, K)``, row j = filter F_j flattened, or None for the identity.
    ``padding`` is symmetric zero padding (ints). ``order``: 0 = cheaper by MAC count (see the module
    docstring / :func:`choose_order`), 1 = basis first, 2 = coefficients first. ``values``, ``basis`` and
    ``bias`` are cast to ``x.dtype``. Input is (N, C, *spatial) or unbatched (C, *spatial).
    """
    g = _conv_geometry(
        x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding
    )
    return _run_ip_conv(g, x, values, indices, basis, bias, order)


def _run_ip_conv(g: dict, x: Tensor, values: Tensor, indices: Tensor, basis: Optional[Tensor],
                 bias: Optional[Tensor], order: int) -> Tensor:
    """The body of ``ip_conv`` once the geometry ``g`` (:func:`_conv_geometry`) is known."""
    if order not in (ORDER_AUTO, *_RUNNERS):
        raise IPFXValueError(
            f"order must be 0 (auto), 1 (basis first), 2 (coefficients first) or 3 (dense), got {order}"
        )
    numel = math.prod(g["weight_shape"])
    _cached(_storage_entry(indices), "checked", (indices._version, numel), lambda: _check_index_range(indices, numel))
    unbatched = x.dim() == g["d"] + 1
    if unbatched:
        x = x.unsqueeze(0)
    out_spatial = _output_spatial(g, x.shape[2:])
    if any(s <= 0 for s in out_spatial):
        raise IPFXValueError(
            f"input spatial size {tuple(x.shape[2:])} is too small for this conv: output size would be {out_spatial}"
        )
    flat = lambda: indices.to(device=x.device, dtype=torch.int64)  # noqa: E731  (only when a matrix is built)
    x = x.contiguous()
    if order == ORDER_AUTO:
        order = _measured_order(g, x, values, indices, flat, basis, out_spatial)
    y = _RUNNERS[order](g, x, values, indices, flat, basis, out_spatial)
    if bias is not None:
        y = y + bias.to(dtype=y.dtype, device=y.device).reshape(1, -1, *([1] * g["d"]))
    if unbatched:
        y = y.squeeze(0)
    return y.contiguous()


@ip_conv.register_fake
def _ip_conv_fake(
    x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding, order
):
    g = _conv_geometry(
        x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding
    )
    # Shape inference by the dense conv itself on fake tensors (handles symbolic shapes and unbatched input).
    w = x.new_empty(g["weight_shape"])
    if g["transposed"]:
        return _CONV_T[g["d"]](x, w, None, g["stride"], g["padding"], g["output_padding"], g["groups"], g["dilation"])
    return _CONV[g["d"]](x, w, None, g["stride"], g["padding"], g["dilation"], g["groups"])


def _no_backward_conv(ctx, grad):
    raise RuntimeError(_INFERENCE_ONLY.format(op="ipfx::ip_conv"))


ip_conv.register_autograd(_no_backward_conv)


def _check_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], weight_shape) -> tuple[int, int]:
    weight_shape = [int(s) for s in weight_shape]
    if len(weight_shape) != 2 or any(s <= 0 for s in weight_shape):
        raise IPFXValueError(f"weight_shape must be (out_features, in_features), got {weight_shape}")
    out_f, in_f = weight_shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise IPFXValueError(f"x must have last dimension in_features = {in_f}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise IPFXTypeError(f"x must be a floating point tensor, got {x.dtype}")
    _check_sparse_storage(values, indices)
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise IPFXValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    return out_f, in_f


@torch.library.custom_op("ipfx::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], weight_shape: list[int]
) -> Tensor:
    """``F.linear(x, W, bias)`` with ``W`` (out, in) stored as nonzeros: ``W.view(-1)[indices] += values``.

    Computed as ``y^T = W @ x^T`` with ``W`` a sparse COO matrix (memory O(nnz)); ``x`` may have any
    leading dims. ``values``/``bias`` are cast to ``x.dtype``.
    """
    out_f, in_f = _check_linear(x, values, indices, bias, weight_shape)
    _cached(_storage_entry(indices), "checked", (indices._version, out_f * in_f),
            lambda: _check_index_range(indices, out_f * in_f))
    lead = x.shape[:-1]
    rhs = x.reshape(-1, in_f).t()

    def coords():
        flat = indices.to(device=x.device, dtype=torch.int64)
        return flat // in_f, flat % in_f

    y = _spmm(_sparse_matrix(values, indices, "linear", (out_f, in_f), coords, rhs), rhs).t()
    if bias is not None:
        y = y + bias.to(dtype=y.dtype, device=y.device)
    return y.reshape(*lead, out_f).contiguous()


@sparse_linear.register_fake
def _sparse_linear_fake(x, values, indices, bias, weight_shape):
    out_f, _ = _check_linear(x, values, indices, bias, weight_shape)
    return x.new_empty((*x.shape[:-1], out_f))


def _no_backward_linear(ctx, grad):
    raise RuntimeError(_INFERENCE_ONLY.format(op="ipfx::sparse_linear"))


sparse_linear.register_autograd(_no_backward_linear)


# ----------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------


def sparse_coefficients(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Nonzeros of ``dense`` as ``(values, indices)``: ``dense.reshape(-1)[indices] == values``.

    Indices are ascending, int32 when ``dense.numel()`` fits in int32 (compact storage), else int64.
    """
    flat = dense.detach().reshape(-1)
    idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
    values = flat[idx].clone()
    index_dtype = torch.int32 if flat.numel() <= _INT32_MAX else torch.int64
    return values, idx.to(index_dtype)


def _densify(values: Tensor, indices: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`sparse_coefficients` (repeated indices summed)."""
    flat = values.new_zeros(numel)
    return flat.index_add_(0, indices.to(device=values.device, dtype=torch.int64), values)


def _tuple(name: str, value: IntSeq, d: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * d
    return tuple(_per_dim(name, list(value), d))


def _as_bias(bias: Optional[Tensor]) -> Optional[nn.Parameter]:
    if bias is None:
        return None
    # requires_grad=False: the op is inference-only.
    return nn.Parameter(bias.detach().clone(), requires_grad=False)


class _SparseStorageMixin:
    """state_dict loading for buffers whose length (nnz) is data dependent.

    A fresh module built from coefficients of the same shape generally has a different nnz; before the
    default (shape-checked) copy, ``values``/``indices`` are resized to the incoming tensors.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("values", "indices"):
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if incoming is None or current is None or incoming.shape == current.shape:
                continue
            dtype = incoming.dtype if name == "indices" else current.dtype
            self._buffers[name] = torch.empty(incoming.shape, dtype=dtype, device=current.device)
        if "indices" in self._buffers and prefix + "indices" in state_dict:
            incoming = state_dict[prefix + "indices"]
            if incoming.dtype != self._buffers["indices"].dtype:
                self._buffers["indices"] = self._buffers["indices"].to(incoming.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _eager_inference(x) -> bool:
    """Plain eager inference: a real tensor, no autograd, nothing tracing. The modules then run the ops'
    implementation directly (the op's dispatch and argument checks cost ~30 us a call, 5% of a batch-1
    resnet50); with autograd on (the ops raise on backward) or under torch.compile/export/fx they call the
    registered op, so graphs show ``ipfx::ip_conv`` and the inference-only guard stays."""
    return type(x) is torch.Tensor and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class SparseIPConv(_SparseStorageMixin, nn.Module):
    """Inference conv whose kernel ``W = reshape(C @ basis, weight_shape)`` is stored as the nonzeros of ``C``.

    Buffers: ``values`` (nnz,), ``indices`` (nnz,) flat indices into ``C.reshape(-1)`` with
    ``C: (w0, w1, K)``, ``basis`` ((K, K) or None = identity); ``bias`` is a (frozen) parameter.
    Geometry attributes follow PyTorch: ``weight_shape`` is ``(c_out, c_in/groups, *k)`` or, for a
    transposed conv, ``(c_in, c_out/groups, *k)``. ``forward`` calls ``torch.ops.ipfx.ip_conv`` (order 0), or
    under ``torch.no_grad()`` in eager mode its implementation directly (:func:`_eager_inference`).
    """

    def __init__(
        self,
        values: Tensor,
        indices: Tensor,
        basis: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        *,
        weight_shape: Sequence[int],
        stride: IntSeq = 1,
        padding: IntSeq = 0,
        dilation: IntSeq = 1,
        groups: int = 1,
        transposed: bool = False,
        output_padding: IntSeq = 0,
    ) -> None:
        super().__init__()
        weight_shape = tuple(int(s) for s in weight_shape)
        if not 3 <= len(weight_shape) <= 5:
            raise IPFXValueError(f"weight_shape must be (w0, w1, *kernel) with 1-3 kernel dims, got {weight_shape}")
        d = len(weight_shape) - 2
        self.weight_shape = weight_shape
        self.stride = _tuple("stride", stride, d)
        self.padding = _tuple("padding", padding, d)
        self.dilation = _tuple("dilation", dilation, d)
        self.output_padding = _tuple("output_padding", output_padding, d)
        self.groups = int(groups)
        self.transposed = bool(transposed)
        _check_sparse_storage(values, indices)
        _check_index_range(indices, math.prod(weight_shape))
        K = math.prod(weight_shape[2:])
        if basis is not None and tuple(basis.shape) != (K, K):
            raise IPFXValueError(f"basis must have shape (K, K) = ({K}, {K}), got {tuple(basis.shape)}")
        self.register_buffer("values", values.detach().clone())
        self.register_buffer("indices", indices.detach().clone())
        self.register_buffer("basis", None if basis is None else basis.detach().clone())
        self.bias = _as_bias(bias)

    @classmethod
    def from_coefficients(
        cls,
        coeff: Tensor,
        basis: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        *,
        weight_shape: Sequence[int],
        stride: IntSeq = 1,
        padding: IntSeq = 0,
        dilation: IntSeq = 1,
        groups: int = 1,
        transposed: bool = False,
        output_padding: IntSeq = 0,
    ) -> "SparseIPConv":
        """Build from the dense, already masked coefficients ``coeff`` (shape (w0, w1, K)); keeps the nonzeros."""
        weight_shape = tuple(int(s) for s in weight_shape)
        expected = (*weight_shape[:2], math.prod(weight_shape[2:]))
        if tuple(coeff.shape) not in (expected, weight_shape):
            raise IPFXValueError(f"coeff must have shape {expected} for weight_shape {weight_shape}, got {tuple(coeff.shape)}")
        values, indices = sparse_coefficients(coeff)
        return cls(
            values,
            indices,
            basis,
            bias,
            weight_shape=weight_shape,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            transposed=transposed,
            output_padding=output_padding,
        )

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def coefficients(self) -> Tensor:
        """Dense ``C`` of shape (w0, w1, K)."""
        w0, w1 = self.weight_shape[:2]
        K = math.prod(self.weight_shape[2:])
        return _densify(self.values, self.indices, w0 * w1 * K).reshape(w0, w1, K)

    def to_dense_weight(self) -> Tensor:
        """``W = reshape(C @ basis, weight_shape)`` (basis None = identity)."""
        c = self.coefficients()
        if self.basis is not None:
            c = c @ self.basis.to(c.dtype)
        return c.reshape(self.weight_shape)

    def forward(self, x: Tensor, order: int = ORDER_AUTO) -> Tensor:
        if _eager_inference(x):  # same computation, without the dispatcher and re-checking the geometry
            key = (x.dim(), x.shape[1 if x.dim() == len(self.weight_shape) else 0], x.dtype, id(self.values),
                   id(self.indices), id(self.basis), id(self.bias))
            g = self.__dict__.get("_geometry")
            if g is None or g[0] != key:
                g = (key, _conv_geometry(x, self.values, self.indices, self.basis, self.bias, self.weight_shape,
                                         self.stride, self.padding, self.dilation, self.groups, self.transposed,
                                         self.output_padding))
                self.__dict__["_geometry"] = g
            return _run_ip_conv(g[1], x, self.values, self.indices, self.basis, self.bias, order)
        return torch.ops.ipfx.ip_conv(
            x,
            self.values,
            self.indices,
            self.basis,
            self.bias,
            list(self.weight_shape),
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.groups,
            self.transposed,
            list(self.output_padding),
            order,
        )

    def extra_repr(self) -> str:
        total = math.prod(self.weight_shape)
        s = (
            f"weight_shape={self.weight_shape}, nnz={self.nnz}/{total} ({100.0 * self.nnz / total:.1f}%), "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"transposed={self.transposed}"
        )
        if self.transposed and any(self.output_padding):
            s += f", output_padding={self.output_padding}"
        s += f", basis={'identity' if self.basis is None else tuple(self.basis.shape)}, bias={self.bias is not None}"
        return s


class SparseLinear(_SparseStorageMixin, nn.Module):
    """Inference linear layer with ``W`` (out, in) stored as nonzeros (``values``, flat ``indices``)."""

    def __init__(self, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None, *, weight_shape: Sequence[int]):
        super().__init__()
        weight_shape = tuple(int(s) for s in weight_shape)
        if len(weight_shape) != 2:
            raise IPFXValueError(f"weight_shape must be (out_features, in_features), got {weight_shape}")
        _check_sparse_storage(values, indices)
        _check_index_range(indices, math.prod(weight_shape))
        self.weight_shape = weight_shape
        self.register_buffer("values", values.detach().clone())
        self.register_buffer("indices", indices.detach().clone())
        self.bias = _as_bias(bias)

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor] = None) -> "SparseLinear":
        """Build from a dense (already masked) weight (out, in); keeps the nonzeros."""
        if weight.dim() != 2:
            raise IPFXValueError(f"weight must be 2-d (out_features, in_features), got shape {tuple(weight.shape)}")
        values, indices = sparse_coefficients(weight)
        return cls(values, indices, bias, weight_shape=weight.shape)

    def to_dense_weight(self) -> Tensor:
        return _densify(self.values, self.indices, math.prod(self.weight_shape)).reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.ipfx.sparse_linear(x, self.values, self.indices, self.bias, list(self.weight_shape))

    def extra_repr(self) -> str:
        total = math.prod(self.weight_shape)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}/{total} ({100.0 * self.nnz / total:.1f}%), bias={self.bias is not None}"
        )
