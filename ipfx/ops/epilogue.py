"""The epilogue of the fused convolution: what ``ipfx::ip_conv`` applies to its result before writing it.

With ``z = conv(x, W) + bias`` the op returns::

    y = act(z + residual)          (residual: a tensor, or none)

``act`` one of :data:`ACTIVATIONS`, ``+`` torch's (broadcasting, type-promoting) addition. Where the
residual has ``z``'s shape and dtype (a ResNet block's identity), the native kernel applies it per tile
while the tile is in cache (:mod:`ipfx.ops.native`, by the activation's number in :data:`ACTIVATIONS`);
every other case computes ``z`` and then calls :func:`apply`, the one definition of each activation here. The passes that fold a
graph's ``add`` and activation into the op (:mod:`ipfx.passes.fuse_epilogue`) read the same table.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..errors import IPFXValueError

# name -> (number the native kernel knows it by, the function on a tensor)
ACTIVATIONS = {
    "none": (0, lambda y: y),
    "relu": (1, F.relu),
    "relu6": (2, F.relu6),
    "silu": (3, F.silu),
    "gelu": (4, F.gelu),  # the exact (erf) form, torch's default
    "hardswish": (5, F.hardswish),
}


def code(activation: str) -> int:
    """The native kernel's number for ``activation`` (checked)."""
    check(activation)
    return ACTIVATIONS[activation][0]


def check(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise IPFXValueError(f"unknown epilogue activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")


def in_kernel(residual: Optional[Tensor], out_shape, dtype) -> bool:
    """Whether a kernel may add ``residual`` per tile: none, or exactly the output's shape and dtype."""
    return residual is None or (tuple(residual.shape) == tuple(out_shape) and residual.dtype == dtype)


def apply(y: Tensor, residual: Optional[Tensor], activation: str) -> Tensor:
    """``act(y + residual)`` (module docstring), where no kernel fuses it."""
    if residual is not None:
        y = y + residual
    return ACTIVATIONS[activation][1](y)


def is_identity(residual: Optional[Tensor], activation: str) -> bool:
    return residual is None and activation == "none"


__all__ = ["ACTIVATIONS", "apply", "check", "code", "in_kernel", "is_identity"]
