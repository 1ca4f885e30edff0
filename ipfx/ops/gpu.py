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
run as 3-d ones with unit leading dims. float16, bfloat16 and float32 inputs (the folded kernel is kept in
float32, the sum too, the result rounded once to the input's dtype); float64 and other devices take the
pure-torch orders, as do launches beyond CUDA's grid limits (:func:`fits`). Where the kernel fails to
compile or launch, one warning says why and the dense order runs from then on (:func:`broken`).

The Triton source is imported on first use. With ``TRITON_INTERPRET=1`` set before Triton is imported,
``triton.jit`` gives Triton's interpreter instead (numpy, on CPU tensors): the tests run the same kernel
that way on a CPU-only machine, against the reference orders. Which calls run it: :mod:`ipfx.ops.order` (``ORDER_GPU``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from .storage import _cached, _folded_csr, _storage_entry, tensor_state

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 128  # output positions per program
GRID_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (output channels, batch)
_state: dict = {}  # "error": why the kernel failed in this process


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
    """The Triton kernel handles this input: a CUDA tensor of a supported dtype, Triton present (and it
    has not failed in this process, :func:`broken`)."""
    return x.device.type == "cuda" and x.dtype in DTYPES and "error" not in _state and available()


def _kernel():
    """The jitted Triton kernel (:mod:`ipfx.ops.triton_conv`; imported on first use)."""
    from . import triton_conv

    return triton_conv.sparse_direct_conv


def folded_operands(g: dict, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor], like: Tensor):
    """CSR ``(crow, col, val)`` of the folded kernel ``W`` over output channels (see the module docstring):
    int32 row pointers and columns ``i*K + t``, float32 values; built on ``like``'s device once per storage
    (cached)."""

    def build():
        crow, col, val = _folded_csr(g, values, flat(), basis, torch.float32, like.device)
        return crow.to(torch.int32), col.to(torch.int32), val

    key = (tensor_state(values), tensor_state(indices), tensor_state(basis), like.device)
    return _cached(_storage_entry(indices), "gpu", key, build)


def folded_density(g: dict, values: Tensor, indices: Tensor, flat, basis: Optional[Tensor]) -> float:
    """Nonzeros of the folded kernel over its size, the Triton kernel's multiply-accumulates relative to the
    dense convolution's, counted without building the kernel (cached per storage): the kept coefficients
    for SP; for IP every tap of each coupled channel pair, ``pairs * K`` (a basis spreads a coefficient over
    all ``K`` taps)."""

    def build():
        K = g["K"]
        kept = torch.unique(flat()).numel() if basis is None else torch.unique(flat() // K).numel() * K
        return kept / max(1, math.prod(g["weight_shape"]))

    key = (tensor_state(values), tensor_state(indices), basis is None)
    return _cached(_storage_entry(indices), "gpu_density", key, build)


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
    grid = (triton.cdiv(p_out, BLOCK), g["c_out"], n)  # positions on the axis without the 65535 limit
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
        _kernel()[grid](
            x, crow, col, val, b, y,
            g["c_in"], g["c_out"], *spatial_in, *spatial_out, *kernel, *stride, *padding, *dilation,
            TRANSPOSED=bool(g["transposed"]), HAS_BIAS=has_bias, BLOCK=BLOCK,
        )
    return y


def fits(g: dict, x: Tensor) -> bool:
    """The launch grid fits CUDA's limits: output channels and batch on grid axes of at most 65535."""
    return g["c_out"] <= GRID_MAX and x.shape[0] <= GRID_MAX


def broken(exc: Exception) -> None:
    """The kernel failed to compile or launch (an unsupported GPU, a missing ``ptxas``, ...): say so once,
    with the reason, and never try it again in this process; the op runs the dense order instead."""
    if "error" not in _state:
        _state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"ipfx: the Triton kernel of torch.ops.ipfx.ip_conv failed ({_state['error']}); the dense "
                      "convolution runs instead. Update Triton, or pass order=3 to choose the dense order yourself.",
                      RuntimeWarning, stacklevel=3)
