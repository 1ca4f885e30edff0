"""Which evaluation order of the fused IP convolution runs (:mod:`ipfx.ops.kernels`).

Cost model used by ``order=0`` (multiply-accumulates per sample, ``P_in``/``P_out`` = number of input/output
spatial positions, ``nnz`` = stored coefficients; groups only enter through ``nnz <= c_out * c_in/groups * K``):

    ordinary conv:   (a) c_in*K*K*P_out + nnz*P_out        (b) nnz*P_in + c_out*K*K*P_out
    transposed conv: (a) c_in*K*K*P_in  + nnz*P_out        (b) nnz*P_in + c_out*K*K*P_in

(a transposed conv does ``K`` MACs per *input* position and filter). With the identity basis, order (a) of an
ordinary 1-d/2-d conv is an im2col (``F.unfold``), a copy, so its basis term is ``c_in*K*P_out`` instead.
The cheaper order is taken; ties go to (a).
"""

from __future__ import annotations

import math
import time

from torch import Tensor

from .geometry import _identity_unfold_applies
from .kernels import _order_a, _order_b, _order_dense
from .storage import _MATRICES, _storage_entry

#: ``order`` argument of :func:`ipfx.ops.ip_conv`.
ORDER_AUTO = 0
ORDER_BASIS_FIRST = 1
ORDER_COEFF_FIRST = 2
ORDER_DENSE = 3  # W rebuilt once from the sparse storage and cached; a plain dense convolution


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
