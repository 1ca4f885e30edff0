"""Max pooling and global average pooling on the native kernel, for frozen deployment graphs.

aten's max_pool2d on a contiguous (NCHW) CPU tensor runs one output at a time, scalar: resnet50's 3x3/2 pool
on 64x112x112 took 5.8 ms at 2 threads, 12% of the frozen fused forward at batch 1 (torch.profiler); its
channels-last kernel is fast, but the fused convolutions read and write NCHW. ``ipfx_native::max_pool2d``
lays each plane out as its windows read it (-inf borders, columns split by stride phase) and compares every
window tap into a block of outputs held in registers instead: 124-134 us for that pool (the same values in
the same order, so the same result to the bit, NaNs and the sign of zero included). :class:`MaxPool2d` runs
it in eager inference and is ``nn.MaxPool2d`` everywhere else (autograd, tracing, export, other dtypes and
devices, arguments aten would refuse), so a graph that holds it exports as ``aten.max_pool2d`` and behaves as
before wherever the native kernel does not apply.

aten's global average pool (``adaptive_avg_pool2d(x, 1)``: every squeeze-excite block, every classifier head)
runs on one thread whatever the thread count: 17 us for 672x14x14, nine of them 6% of a batch-1
mobilenet_v3_large at 95%. :class:`GlobalAvgPool2d` runs ``ipfx_native::channel_mean`` in eager inference
instead (each plane's sum by one thread in a fixed order: 2.2x faster there at 2 threads; not aten's order of
additions, so the last bits of a mean may differ from aten's, as they do between aten's own kernels) and is
``nn.AdaptiveAvgPool2d(1)`` everywhere else.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import native
from .modules import _eager_inference


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else v


def pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """aten's output length of a pooling window along one dim (``pooling_output_shape``): the number of
    window starts ``o * stride - padding``, rounded up in ``ceil_mode`` as long as the last window starts
    inside the input or its left padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def native_geometry(x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> Optional[tuple]:
    """``(kernel, stride, padding, dilation, out_spatial)`` as pairs where the native kernel computes exactly
    what ``F.max_pool2d(x, ...)`` would (a contiguous float32/float64 CPU tensor of 4 dims, arguments aten
    accepts: positive sizes, padding at most half the kernel, a non-empty output); otherwise None."""
    if x.dim() != 4 or not x.is_contiguous() or not native.supports(x):
        return None
    k, d, p = _pair(kernel), _pair(dilation), _pair(padding)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
    if len(k) != 2 or len(s) != 2 or len(p) != 2 or len(d) != 2:
        return None
    if min(k) < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0 or p[0] > k[0] // 2 or p[1] > k[1] // 2:
        return None
    out = tuple(pooled_size(int(x.shape[2 + a]), k[a], s[a], p[a], d[a], ceil_mode) for a in range(2))
    if min(out) < 1:
        return None
    return k, s, p, d, out


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (without indices) whose eager inference on contiguous float CPU tensors runs the native
    kernel (module docstring); the same attributes, state (none) and results."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.return_indices and _eager_inference(x):
            geometry = native_geometry(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
            if geometry is not None:
                return native.max_pool2d(x, *geometry)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)

    @classmethod
    def like(cls, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> "MaxPool2d":
        """The module for ``F.max_pool2d``'s / ``aten.max_pool2d``'s arguments (``stride`` None or empty:
        the kernel size)."""
        if stride is not None and not isinstance(stride, int) and len(stride) == 0:
            stride = None
        return cls(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def channel_mean_applies(x: Tensor) -> bool:
    """The native global average pool computes ``F.adaptive_avg_pool2d(x, 1)`` (up to the order of additions)
    for this ``x``: a contiguous float32/float64 CPU tensor of 4 dims with non-empty planes."""
    return x.dim() == 4 and x.is_contiguous() and x.shape[2] * x.shape[3] > 0 and native.supports(x)


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` whose eager inference on contiguous float CPU tensors runs the native channel
    mean (module docstring)."""

    def __init__(self):
        super().__init__(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.output_size in (1, (1, 1)) and _eager_inference(x) and channel_mean_applies(x):
            return native.channel_mean(x)
        return F.adaptive_avg_pool2d(x, self.output_size)
