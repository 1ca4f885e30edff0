"""The batch-blocked layout of a program (:mod:`ipfx.ops.program`): which steps run on it, where values change
layout.

A batch of ``N = nb * L`` samples (``L`` the native kernel's vector of float32 numbers: 16 with AVX-512, 8 with
AVX2) is held as ``xb[nb][c][h][w][l] = x[nb * L + l][c][h][w]`` (``ipfx_native::to_blocked``). The direct
sparse convolution then reads one whole, aligned vector per kept coefficient and output position, the L
samples of one input position (``csrc/blocked.h``), where the NCHW layout's vectors of neighbouring positions
are unaligned for all taps of a row but one (benchmarks/roofline.py: that loop's ceiling 35% of the
multiply-add limit, 50-55% with aligned reads); and a value stays in this layout from one step to the next
instead of being converted per call. The numbers are those the NCHW program computes: the blocked max pool
and channel mean compute the NCHW kernels' numbers bit for bit, the ops of :data:`LAYOUT_FREE` compute each
number from the numbers at the same ``(n, c, h, w)`` of their inputs, and the blocked conv sums in the NCHW
direct path's order (bit for bit where the NCHW call takes that path or the gather path's 64-position tiles;
the same products in another order where it gathers in tiles of 16 or 32 positions, ``c_in * K`` over 2048
on small maps).

:func:`plan` decides, per step of a program built for one input signature: a conv step runs blocked where its
bound kernel can (``runs_blocked``: SP, 2-d, ungrouped, bound for one input size of more than one position) and its input
is a float32 batch of a multiple of L samples; a native max pool or channel mean step (:func:`blocked_form`)
where its input is held blocked (the channel mean's result is NCHW: a squeeze-excite's or a head's); an op of
:data:`LAYOUT_FREE` where one of its inputs is held blocked and every tensor it reads or returns is such a
batch (4-d, N samples: so that broadcasting over ``h``, ``w`` or ``c`` means the same in both layouts). Any
other step reads NCHW values; the program converts a value once where a step needs the other layout, and its
outputs are NCHW.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import native

aten = torch.ops.aten

#: Whether programs use the blocked layout where :func:`plan` finds a step for it (a switch for measurements).
#: Measured: benchmarks/fused-blocked-epyc-zen5-avx512.md.
ENABLED = True

#: aten ops that compute each number of their result from the numbers at the same index of their tensor inputs
#: (broadcast over size-1 dims) and their scalar arguments: the same numbers in any layout of the batch. Not
#: the in-place forms: a step on a converted copy would leave the value other steps read unchanged.
LAYOUT_FREE = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
    aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
    aten.sigmoid.default, aten.hardsigmoid.default, aten.hardswish.default, aten.silu.default,
    aten.gelu.default, aten.tanh.default, aten.neg.default, aten.clone.default,
})


def _blocked_forms() -> dict:
    native_ops = torch.ops.ipfx_native
    return {  # NCHW op: (its blocked form, whether that form's result is held blocked)
        native_ops.max_pool2d.default: (native_ops.max_pool2d_blocked.default, True),
        native_ops.channel_mean.default: (native_ops.channel_mean_blocked.default, False),
    }


def lanes() -> int:
    """L: samples per vector of the layout (float32)."""
    return native.vector_bytes() // 4


def to_blocked_op():
    return torch.ops.ipfx_native.to_blocked.default


def from_blocked_op():
    return torch.ops.ipfx_native.from_blocked.default


def blocked_form(op):
    """The blocked form of a pool op of :func:`plan` and whether its result is held blocked, or None."""
    return _blocked_forms().get(op)


def plan(steps: list, meta: dict, runs_blocked: Callable, keep: set = frozenset()) -> tuple[set, set]:
    """``(runs, held)``: the steps (their nodes) that run on the blocked layout, and the nodes whose values are
    held in it (module docstring). ``steps``: ``(node, step)`` in order, as :mod:`ipfx.ops.program` builds
    them; ``meta``: ``{node: (shape, dtype)}`` of every tensor value; ``runs_blocked(bound)``: whether a conv
    step's bound kernel runs blocked; ``keep``: conv steps that stay NCHW (a pointwise conv and the grouped
    conv that alone reads it, run as one step)."""
    if not ENABLED or not native.available():
        return set(), set()
    L = lanes()

    def batched(node, n=None) -> bool:
        m = meta.get(node)
        if m is None or m[1] is not torch.float32 or len(m[0]) != 4 or m[0][0] == 0 or m[0][0] % L:
            return False
        return n is None or m[0][0] == n

    runs, held = set(), set()
    forms = _blocked_forms()
    for node, step in steps:
        kind = step[0]
        if kind == "conv":
            bound, x, residual = step[2][0], step[3], step[4]
            if (node not in keep and runs_blocked(bound) and batched(x) and batched(node, meta[x][0][0])
                    and (residual is None or batched(residual, meta[x][0][0]))):
                runs.add(node)
                held.add(node)
        elif kind == "op":
            op, places = step[1], step[3]
            reads = [n for _, n in places]
            if op in forms and len(reads) == 1 and reads[0] in held:
                runs.add(node)
                if forms[op][1]:
                    held.add(node)
            elif (op in LAYOUT_FREE and reads and any(n in held for n in reads) and batched(node)
                  and not any(isinstance(a, torch.Tensor) for a in step[2])  # (a constant: NCHW broadcasting)
                  and all(batched(n, meta[node][0][0]) for n in reads)):
                runs.add(node)
                held.add(node)
    # all or nothing: a conv that stays NCHW between blocked ones costs two conversions of its input and output
    # per call (mobilenet_v3_large at 95%, batch 32, its expansion + depthwise pairs NCHW and the rest blocked:
    # 2.3x the NCHW program's time), so the layout is used only where every conv on maps of more than one
    # position runs on it
    for node, step in steps:
        if step[0] == "conv" and node not in runs and node in meta and len(meta[node][0]) == 4:
            x = meta.get(step[3])
            if x is None or len(x[0]) != 4 or x[0][2] * x[0][3] > 1:
                return set(), set()
    return runs, held
