"""The evaluation orders of the fused IP convolution (pure-torch kernels).

The algebra
-----------
Convolution (and transposed convolution) is bilinear in input and kernel, and ``W[a, b] = sum_j C[a, b, j] F_j``
(storage and coupling: :mod:`ipfx.ops.storage`), so with ``conv`` standing for either of the two (same
stride/padding/dilation/output_padding):

    y[o] = sum_i sum_j M[o, i, j] conv(x[i], F_j)          (M[o, i, j] = C entry coupling o and i, else 0)
         = sum_j conv( sum_i M[o, i, j] x[i], F_j )

which gives two evaluation orders, neither of which materialises ``W``:

(a) *basis first*: convolve every input channel with the ``K`` basis filters (one grouped conv,
    groups = c_in), giving ``c_in*K`` maps at output resolution, then contract
    them with the sparse ``(c_out, c_in*K)`` matrix ``A[o, i*K + j] = M[o, i, j]`` (block-diagonal over groups).
(b) *coefficients first*: contract the input with the sparse ``(c_out*K, c_in)`` matrix
    ``Bm[o*K + j, i] = M[o, i, j]`` into ``c_out*K`` maps at input resolution, then apply the ``K`` basis
    filters to each output channel's ``K`` maps and sum over ``j`` (one grouped conv, groups = c_out).

Both sparse matrices are built from ``indices`` in O(nnz) memory (a COO tensor, converted to CSR) and cached
per storage; the dense block-diagonal matrix is never formed. A third order, *dense*, rebuilds ``W`` once
(cached) and runs the dense convolution; a fourth, *native*, computes order (a) tile by tile in C++ without
whole-image maps (:mod:`ipfx.ops.native`, CPU; a grouped conv with a basis runs its folded kernel there,
:func:`folds_in_native`); a fifth, *gpu*, folds the basis into the sparse kernel and
convolves directly in Triton (:mod:`ipfx.ops.gpu`, CUDA). Which order runs is decided in
:mod:`ipfx.ops.order`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..form.compose import compose_weight
from .geometry import _identity_unfold_applies
from .storage import _cached, _coupling, _densify, _folded_csr, _sparse_matrix, _storage_entry, tensor_state

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


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


def conv_layout(x: Tensor) -> torch.memory_format:
    """The memory format a dense weight is kept in for convolving ``x``: ``channels_last`` (4-d) or
    ``channels_last_3d`` (5-d) where ``x`` is laid out so and not also contiguous (a 1x1 map or one channel
    is both), else ``contiguous_format``. torch's CPU convolution computes a channels-last input in that
    layout and converts a weight that is not (a copy of the whole dense weight on every call); a weight
    already in it gives the same numbers without the copy."""
    layout = _CHANNELS_LAST.get(x.dim())
    if layout is not None and not x.is_contiguous() and x.is_contiguous(memory_format=layout):
        return layout
    return torch.contiguous_format


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _dense_weight(g: dict, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], like: Tensor) -> Tensor:
    """``W = reshape(C @ basis, weight_shape)`` in ``like``'s dtype and device, laid out for convolving ``like``
    (:func:`conv_layout`), rebuilt once per storage and layout (cached)."""
    layout = conv_layout(like)

    def build():
        w0, w1 = g["weight_shape"][:2]
        c = _densify(values.to(like.dtype), flat(), w0 * w1 * g["K"]).reshape(w0, w1, g["K"])
        b = None if basis is None else basis.to(dtype=like.dtype, device=like.device)
        return compose_weight(c, None, b, g["weight_shape"], b is not None).contiguous(memory_format=layout)

    key = (tensor_state(values), tensor_state(indices), tensor_state(basis), like.dtype, like.device, layout)
    which = "dense" if layout == torch.contiguous_format else f"dense {layout}"  # (one kept per layout)
    return _cached(_storage_entry(indices), which, key, build)


def _dense_conv_partial(g: dict, weight: Tensor, bias: Optional[Tensor]):
    """``x -> conv(x, weight, bias)`` with ``g``'s geometry, as a partial of the torch function."""
    if g["transposed"]:
        return functools.partial(_CONV_T[g["d"]], weight=weight, bias=bias, stride=g["stride"], padding=g["padding"],
                                 output_padding=g["output_padding"], groups=g["groups"], dilation=g["dilation"])
    return functools.partial(_CONV[g["d"]], weight=weight, bias=bias, stride=g["stride"], padding=g["padding"],
                             dilation=g["dilation"], groups=g["groups"])


def _dense_conv(g: dict, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _dense_conv_partial(g, weight, bias)(x)


def _order_dense(g: dict, x: Tensor, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], out_spatial,
                 bias: Optional[Tensor] = None) -> Tensor:
    """W = reshape(C @ basis, weight_shape) rebuilt once per storage (cached), then one dense convolution
    (which adds ``bias`` itself).

    Storage stays sparse (what is saved and shipped); this trades run-time memory for the speed of the
    dense kernels where the sparse orders are slower (the cost model, :mod:`ipfx.ops.order`).
    """
    weight = _dense_weight(g, values, indices, flat, basis, x)
    return _dense_conv(g, x, weight, None if bias is None else bias.to(dtype=x.dtype, device=x.device))


def _native_operands(g: dict, values: Tensor, indices: Tensor, flat, like: Tensor) -> tuple:
    """CSR ``(crow, col, vals)`` of order (a)'s ``A[o, i*K + j]`` and the used-row flags, cached per storage."""
    K = g["K"]

    def coords():
        o, i, j = _coupling(g, flat())
        return o, i * K + j

    shape = (g["c_out"], g["c_in"] * K)
    csr = _sparse_matrix(values, indices, "a", shape, coords, like)
    key = (shape, tensor_state(values), tensor_state(indices), like.dtype)

    def build():
        col = csr.col_indices()
        used = torch.zeros(shape[1], dtype=torch.uint8)
        used[col] = 1
        return csr.crow_indices().contiguous(), col.contiguous(), csr.values().contiguous(), used

    return _cached(_storage_entry(indices), "native", key, build)


def folds_in_native(g: dict, basis: Optional[Tensor]) -> bool:
    """Whether the native kernel runs this conv as its folded kernel ``W = C @ B`` (SP form, the basis folded
    into the coefficients) on the direct grouped path, instead of order (a): grouped, not transposed, with a
    basis, at most :data:`ipfx.ops.native.FOLD_MAX_GROUP_CHANNELS` input channels a group (the measurements
    there). Order (a) applies all ``K`` basis filters to each of a group's ``c_in/groups`` input channels,
    ``c_in K K`` multiply-adds a position: 9x a 3x3 depthwise conv's dense work. The folded kernel costs ``K``
    taps for each coupled pair (o, i), at most the dense conv's work, and an output channel without a kept
    coefficient is written in one pass."""
    from .native import FOLD_MAX_GROUP_CHANNELS

    return (basis is not None and g["groups"] > 1 and not g["transposed"]
            and g["c_in"] // g["groups"] <= FOLD_MAX_GROUP_CHANNELS)


def _native_conv_operands(g: dict, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor],
                          like: Tensor) -> tuple:
    """What the native kernel is called with: CSR ``(crow, col, vals)``, the used-column flags, the basis (in
    ``like``'s dtype, or None) and the path (``direct``: None for the size rule): order (a)'s matrix and the
    basis, or, where :func:`folds_in_native`, the folded kernel's matrix (:func:`ipfx.ops.storage._folded_csr`,
    cached per storage), no basis and the direct path."""
    if not folds_in_native(g, basis):
        b = None if basis is None else basis.to(dtype=like.dtype).contiguous()
        return (*_native_operands(g, values, indices, flat, like), b, None)

    def build():
        crow, col, vals = _folded_csr(g, values, flat(), basis, like.dtype, torch.device("cpu"))
        used = torch.zeros(g["c_in"] * g["K"], dtype=torch.uint8)
        used[col] = 1
        return crow, col, vals, used, None, True

    key = (tensor_state(values), tensor_state(indices), tensor_state(basis), like.dtype)
    return _cached(_storage_entry(indices), "native_folded", key, build)


def _order_native(g: dict, x: Tensor, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], out_spatial,
                  bias: Optional[Tensor] = None, residual: Optional[Tensor] = None, activation: int = 0) -> Tensor:
    """Order (a) tile by tile in the native CPU kernel (:mod:`ipfx.ops.native`), or the folded kernel where
    :func:`folds_in_native`; adds ``bias`` itself and applies the epilogue (``residual``, ``activation``:
    :mod:`ipfx.ops.epilogue`'s number) in the tile."""
    from . import native

    crow, col, vals, used, b, direct = _native_conv_operands(g, values, indices, flat, basis, x)
    bias = None if bias is None else bias.to(dtype=x.dtype).contiguous()
    residual = None if residual is None else residual.to(dtype=x.dtype).contiguous()
    return native.conv(x, crow, col, vals, b, bias, used, g, out_spatial, residual, activation, direct)


def _order_gpu(g: dict, x: Tensor, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], out_spatial,
               bias: Optional[Tensor] = None) -> Tensor:
    """The folded sparse direct convolution in Triton (:mod:`ipfx.ops.gpu`, CUDA); adds ``bias`` itself."""
    from . import gpu

    operands = gpu.folded_operands(g, values, indices, flat, basis, x)
    try:
        return gpu.conv(g, x, operands, bias, out_spatial)
    except Exception as exc:  # noqa: BLE001  (Triton's compile and launch errors have no common base)
        if not x.is_cuda:  # the interpreter (tests): a kernel bug, not a missing toolchain
            raise
        gpu.broken(exc)
        return _order_dense(g, x, values, indices, flat, basis, out_spatial, bias)
