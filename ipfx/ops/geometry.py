"""Argument checks and geometry of the fused ops (shape-only checks run in the fake kernels too; data checks,
such as the index range, only in the real kernels).

``_conv_geometry`` normalises the arguments of ``ipfx::ip_conv`` into a dict ``g`` that every other module
reads: ``d`` (spatial dims), ``kernel``, ``K = prod(kernel)``, ``c_in``, ``c_out``, ``groups``,
``weight_shape``, ``stride``/``padding``/``dilation``/``output_padding`` (one entry per spatial dim) and
``transposed``. Output sizes follow PyTorch's formulas (:func:`_output_spatial`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import IPFXTypeError, IPFXValueError

IntSeq = Union[int, Sequence[int]]


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


def _identity_unfold_applies(g: dict, identity_basis: bool) -> bool:
    return identity_basis and not g["transposed"] and g["d"] <= 2


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


def _tuple(name: str, value: IntSeq, d: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * d
    return tuple(_per_dim(name, list(value), d))
