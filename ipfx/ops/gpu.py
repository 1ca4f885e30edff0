"""The GPU kernel of ``ipfx::ip_conv``: a Triton direct convolution with the folded sparse kernel.

The algebra
-----------
The kernel is ``W = reshape(C @ B, weight_shape)`` (:mod:`ipfx.ops.storage`). Folding the basis into the
coefficients gives ``W`` itself, and ``W[o, i, :]`` is zero wherever no kept coefficient couples output
channel ``o`` with input channel ``i``. So the convolution is a direct sum over the nonzeros of ``W``,

    y[n, o, p] = bias[o] + sum_{(i, t) in row o} W[o, i, t] * x[n, i, in(p, t)]

with ``in(p, t) = p * stride - padding + t * dilation`` per spatial dim (a transposed conv reads
``(p + padding - t * dilation) / stride`` where that is an integer in range). Row ``o`` of the CSR
holds its ``(column i*K + t, value)`` pairs, block-diagonal over groups through the channel coupling of
:func:`ipfx.ops.storage._coupling`. For SP (identity basis) the nonzeros of ``W`` are the kept
coefficients themselves: a direct sparse convolution with ``nnz * P_out`` multiply-accumulates. For IP
each coupled channel pair brings its whole ``K``-tap filter: ``pairs * K * P_out``, where ``pairs`` is the
number of ``(o, i)`` pairs with a kept coefficient, at most ``min(nnz, c_out * c_in / groups)``. No
basis map is ever formed, and one kernel serves both spaces and every geometry.

The kernel
----------
One program computes ``BLOCK`` consecutive output positions of one ``(n, o)``: it walks row ``o``,
gathers the input numbers each entry reads (masked at the borders; contiguous along the output row at
stride 1, so loads coalesce), accumulates in float32 and writes its block once. 1-d and 2-d convs are
run as 3-d ones with unit leading dims. float16, bfloat16 and float32 inputs; float64 and other
devices take the pure-torch orders.

The Triton source is imported on first use. With ``TRITON_INTERPRET=1`` set before Triton is imported,
``triton.jit`` gives Triton's interpreter instead (numpy, on CPU tensors): the tests run the same kernel
that way on a CPU-only machine, against the reference orders. Which calls run it: :mod:`ipfx.ops.order` (``ORDER_GPU``).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from ..compose import compose_weight
from .storage import _cached, _coupling, _densify, _storage_entry

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 128  # output positions per program


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Triton is importable (it ships with torch's CUDA builds)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken Triton install is the same as none here)
        return False
    return True


def supports(x: Tensor) -> bool:
    """The Triton kernel handles this input: a CUDA tensor of a supported dtype, Triton present."""
    return x.device.type == "cuda" and x.dtype in DTYPES and available()


def _kernel():
    """The jitted Triton kernel (:mod:`ipfx.ops.triton_conv`; imported on first use)."""
    from . import triton_conv

    return triton_conv.sparse_direct_conv


def folded_operands(g: dict, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], like: Tensor):
    """CSR ``(crow, col, val)`` of the folded kernel ``W`` over output channels (see the module docstring):
    int32 row pointers and columns ``i*K + t``, float32 values; built on ``like``'s device once per storage
    (cached)."""

    def build():
        K = g["K"]
        w0, w1 = g["weight_shape"][:2]
        dev = like.device
        c = _densify(values.to(device=dev, dtype=torch.float32), flat(), w0 * w1 * K).reshape(w0, w1, K)
        b = None if basis is None else basis.to(device=dev, dtype=torch.float32)
        w = compose_weight(c, None, b, (w0, w1, K), b is not None).reshape(-1)
        nz = torch.nonzero(w).reshape(-1)
        o, i, t = _coupling(g, nz)  # W is (w0, w1, K) like C, its last index the tap
        col = i * K + t
        order = torch.argsort(o * (g["c_in"] * K) + col)
        counts = torch.bincount(o, minlength=g["c_out"])
        crow = torch.zeros(g["c_out"] + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.cumsum(counts, 0)
        return crow.to(torch.int32), col[order].to(torch.int32), w[nz][order].contiguous()

    key = (id(values), values._version, indices._version, None if basis is None else (id(basis), basis._version),
           like.device)
    return _cached(_storage_entry(indices), "gpu", key, build)


def folded_density(g: dict, operands) -> float:
    """Nonzeros of the folded kernel over its size: the Triton kernel's multiply-accumulates relative to
    the dense convolution's."""
    return operands[1].numel() / max(1, math.prod(g["weight_shape"]))


def conv(g: dict, x: Tensor, operands, bias: Optional[Tensor], out_spatial) -> Tensor:
    """Run the kernel (``x`` batched and contiguous, ``operands`` from :func:`folded_operands`); CUDA
    tensors, or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported)."""
    import triton

    crow, col, val = operands
    d = g["d"]
    lead = 3 - d  # unit leading dims: every conv runs as a 3-d one
    spatial_in = [1] * lead + list(x.shape[2:])
    spatial_out = [1] * lead + list(out_spatial)
    kernel = [1] * lead + list(g["kernel"])
    stride = [1] * lead + list(g["stride"])
    padding = [0] * lead + list(g["padding"])
    dilation = [1] * lead + list(g["dilation"])
    n = x.shape[0]
    y = torch.empty((n, g["c_out"], *out_spatial), dtype=x.dtype, device=x.device)
    p_out = math.prod(spatial_out)
    if y.numel() == 0:
        return y
    has_bias = bias is not None
    b = bias.to(device=x.device, dtype=torch.float32).contiguous() if has_bias else val  # (unread without bias)
    grid = (n * g["c_out"], triton.cdiv(p_out, BLOCK))
    _kernel()[grid](
        x, crow, col, val, b, y,
        g["c_in"], g["c_out"], *spatial_in, *spatial_out, *kernel, *stride, *padding, *dilation,
        TRANSPOSED=bool(g["transposed"]), HAS_BIAS=has_bias, BLOCK=BLOCK,
    )
    return y
