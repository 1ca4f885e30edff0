"""Which evaluation order of the fused IP convolution runs (:mod:`ipfx.ops.kernels`).

``order=0`` (``ORDER_AUTO``) picks by a *cost model*, a pure function of the geometry, the batch size, the
element size and ``nnz``: the same model and input shape take the same order, hence give the same numbers, on
every call and in every process (no timing; see :func:`order_costs`). The user may ask for timing instead:
``order=-1`` (``ORDER_TUNED``), or the environment variable ``IPFX_AUTOTUNE=1`` which makes ``order=0`` mean
``-1``; then the first call per storage and input shape times every candidate order and keeps the fastest
(results then differ between processes by rounding, as the choice may).

The work terms (per batch of ``N``; ``P_in``/``P_out`` input/output spatial positions, ``Pb`` the positions
a basis filter is applied at, ``P_out`` for a conv and ``P_in`` for a transposed conv; ``nnz`` stored
coefficients; groups only enter through ``nnz <= c_out * c_in/groups * K``):

    order              basis (MACs)          maps (elements moved)   sparse (MACs)
    (a) basis first    N c_in K K Pb  [1]    N c_in K P_out          N nnz P_out
    (b) coeff first    N c_out K K Pb        N c_out K P_in          N nnz P_in
    native (tiled)     N u K P_out           N c_in K P_out [2]      N nnz P_out      taps: N K P_out [3],
                                                                                      rows: N c_out T [4],
                                                                                      runs: N u' T S [5]
    dense              dense: N c_out (c_in/groups) K Pb MACs (``dense_grouped`` instead when groups > 1),
                       io: N (c_in P_in + c_out P_out) elements read/written

    [1] with the identity basis an ordinary 1-d/2-d conv's basis stage is an im2col copy: no MACs, only maps.
    [2] numbers gathered into the in-cache tile, not whole-image maps; with the identity basis (SP) there are
        no basis MACs and only ``N u P_out`` numbers are gathered. ``u`` is the expected number of basis-
        response rows ``i*K + j`` that some kept coefficient reads, for ``nnz`` coefficients spread
        uniformly: ``u = c_in K (1 - (1 - density)^(c_out/groups))``, density = nnz / (c_out (c_in/groups) K).
    [3] entries of the per-tile tap -> input offset tables.
    [4] CSR row visits: every output channel once per tile, ``T = ceil(P_out / tile)`` tiles per sample
        (:func:`ipfx.ops.native.tile_for`).
    [5] gather runs (a per-run cost: small images make many short copies): ``u'`` rows gathered per tile
        (``c_in K`` with a basis, ``u`` without), ``S = ceil(tile / W_out) + 1`` output-row segments per tile,
        ``W_out`` the innermost output size.

A grouped conv with a basis and few channels a group runs natively as its folded kernel on the direct path
(:func:`ipfx.ops.kernels.folds_in_native`): its native terms are SP's direct ones, with :func:`folded_nnz`
nonzeros.

Predicted time = ``t0 + sum(rate * term)`` with per-order constants (:data:`COST_CONSTANTS`, nanoseconds,
float32) fitted once by non-negative least squares on relative error on this project's machine
(``python benchmarks/calibrate.py``, which prints them; the fit and every problem's pick are in
``benchmarks/calibration.md``); terms scale with the element size over 4. Orders whose intermediate maps
would exceed 16x the input plus output are never chosen (a 7x7 stride-2 stem in order (b) would need
``c_out*49`` maps at input resolution: gigabytes at batch 32). The cheapest order wins; ties go to the lower
order number. The native order is a candidate only where the native kernel is built and supports the input
(:func:`ipfx.ops.native.supports`), so two processes agree when both have it, or both lack it.
"""

from __future__ import annotations

import functools
import math
import os
import time

import torch
from torch import Tensor

from ..errors import IPFXValueError
from .geometry import _identity_unfold_applies
from .kernels import _order_a, _order_b, _order_dense, _order_gpu, _order_native, folds_in_native
from .native import direct_applies, tile_for
from .storage import _MATRICES, _storage_entry, tensor_state

#: ``order`` argument of :func:`ipfx.ops.ip_conv`.
ORDER_TUNED = -1  # time the candidates once per storage and input shape (asked for explicitly)
ORDER_AUTO = 0  # the cost model (deterministic); ``IPFX_AUTOTUNE=1`` turns it into ORDER_TUNED
ORDER_BASIS_FIRST = 1
ORDER_COEFF_FIRST = 2
ORDER_DENSE = 3  # W rebuilt once from the sparse storage and cached; a plain dense convolution
ORDER_NATIVE = 4  # order (a) tile by tile in the native CPU kernel (ipfx.ops.native), where it is available
ORDER_GPU = 5  # the folded sparse direct conv in Triton (ipfx.ops.gpu), CUDA, where Triton is available

#: On CUDA, ``order=0`` runs the Triton kernel when the folded kernel's nonzeros (its multiply-accumulates)
#: are at most this fraction of the dense kernel's, else cuDNN's dense convolution. Measured on an H200
#: (``python benchmarks/fused_gpu.py``: the benchmark's eight ResNet/MobileNet layers, 90-99%, batch 1 and
#: 32, float32 and bfloat16) the Triton kernel was slower than cuDNN on every layer, 1.3x at best and up to
#: 226x (IP, batch 32); so only a conv that keeps no weight at all (nothing to sum: the kernel writes the bias)
#: takes it unasked. ``order=5`` forces it, and ``IPFX_AUTOTUNE=1`` times it against cuDNN.
GPU_DENSITY_MAX = 0.0

#: Term names of the cost model, in the order of each row of :data:`COST_CONSTANTS`.
COST_TERMS = ("t0", "basis", "maps", "sparse", "dense", "dense_grouped", "io", "taps", "rows", "runs")

#: ns per unit of each term (``COST_TERMS``), per order, float32; fitted by ``python benchmarks/calibrate.py
#: --threads 1 --reps 7`` (AMD EPYC with AVX-512, g++ 12, torch 2.14.1, 2026-12-01; fit quality in
#: ``benchmarks/calibration.md``: median error of predicted times 15%, the pick within 10% of the fastest
#: order in 91% of 92 problems; the worst picks are the native kernel on a depthwise 5x5 SP layer at 90% and
#: batch 4 (2.2x the dense conv) and on a 256 -> 16 channel 3x3 SP layer at 90% (1.3-1.6x), where many short
#: gathers feed few multiply-accumulates). Fitted with one thread because the machine was shared: two-thread
#: timings then varied 10x (OpenMP barriers wait for a thread another job has preempted). With more threads
#: the work terms shrink about in proportion and t0 does not, which favours the dense order slightly less
#: than it should. ``dense_grouped`` (the dense order's MACs of a grouped conv) was refitted on its own on an AMD
#: EPYC with AVX2 (``python benchmarks/calibrate_grouped.py``, ``benchmarks/calibrate_grouped.md`` and
#: ``calibrate_grouped-2threads.md``): 112 grouped problems (depthwise 3x3/5x5, groups of 4-32 channels; SP and
#: IP; 50-99%), dense order against native, the others held. torch's grouped CPU conv runs 2-6x slower per MAC
#: than the fit above assumed (a depthwise 3x3 240@14: 140 us at 1 thread, 45 predicted), so the model kept the
#: dense order where the native kernel was up to 3-6x faster. At 0.07 ns per MAC (from 0.03123) the faster of
#: the two is picked in 95 of 112 problems at 1 thread (85 at 0.03123) and 99 at 2 threads (85); mean pick /
#: fastest 1.07x (1.19x) and 1.04x (1.18x); worst 2.3x (6.6x) and 2.1x (5.3x) (the files; runs differ by a few
#: problems, and 0.06-0.08 did about as well in each). ``dense`` (ungrouped convs) and orders (a)/(b) in torch
#: were refitted the same way on that machine (``--layers ungrouped --batches 1,8 --torch-scales ...``: 136
#: stems, resnet and mobilenet convs, SP/IP, 50-99%, batch 1 and 8; ``benchmarks/calibrate_ungrouped.md``,
#: ``-2threads.md``): torch's ungrouped conv costs 0.03-0.04 ns per MAC there, and far more with 3 input
#: channels (a 3 -> 64 7x7/2 stem at batch 8: 43 ms, 0.046 ns/MAC; 3 -> 32 3x3/2: 0.13), and orders (a)/(b)
#: ran 2.6-4x their prediction (an IP 7x7 stem: 476 ms at batch 32, 116 predicted). At 0.034 ns/MAC (from
#: 0.01884) and orders (a)/(b) at twice their old constants, the model picks the fastest order in 243 of 272
#: problems at 2 threads (229 before; mean pick / fastest 1.050x, 1.066x before) and 239 at 1 thread (239;
#: 1.032x, 1.037x); the dense term alone, without (a)/(b), handed IP 7x7 stems to order (a) (IP resnet18
#: 1.16-1.71x slower). Whole programs, in-process A/B against the old constants (2 threads, 5 interleaved
#: rounds): IP mobilenet_v3_large at 95% 0.99x (b1) / 0.88x (b32), IP resnet18 0.98x / 1.00x, SP
#: mobilenet_v3_large and resnet50 the same picks at batch 1 (0.94-1.02x: noise).
COST_CONSTANTS = {
    ORDER_BASIS_FIRST: (5.104e04, 0.001592, 2.932, 0.2994, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ORDER_COEFF_FIRST: (2.394e05, 0.8202, 2.876, 0.2592, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ORDER_DENSE: (9022.0, 0.0, 0.0, 0.0, 0.034, 0.07, 0.2386, 0.0, 0.0, 0.0),
    ORDER_NATIVE: (1.287e04, 0.04203, 0.03318, 0.07377, 0.0, 0.0, 0.0, 0.2363, 11.76, 0.3654),
}

#: Intermediate maps of a sparse order may be at most this many times the input plus output.
MAPS_BUDGET = 16

#: A pointwise SP conv on single-position maps (a squeeze-excitation's) is a sparse matrix times the batch's
#: vectors, which the native kernel runs as such (``linear_rows``: one pass over the matrix for a sample, one
#: per four samples past that), and which the general terms do not describe (they cost 64-position tiles, and
#: the dense order's constants were fitted on convs that reuse each weight over many positions). There the two
#: orders are costed on their own (ns): native ``a + b nnz`` at batch 1, ``a + c N nnz`` past it; dense ``d + e
#: W`` at batch 1, ``f + h W + g N W`` past it, for the ``W`` dense weights (F.conv2d's call then costs ~44 us,
#: and more with the weight's size). Fitted on 960<->240, 672->168 and 72->24 at 5/10/20/50% kept, batch
#: 1/4/8/32/128, 2 threads (an AMD Zen 5): the faster order picked in 76 of those 80, at worst 1.41x the
#: faster's time. The rule before (native only up to batch 4, the general terms past it): 48 of 74 (6 more
#: went to orders (a)/(b)), at worst 6.6x. SP mobilenet_v3_large at 95%, whole program, in-process A/B
#: against that rule (6 rounds): batch 32 0.94x (0.90-1.00), batch 8 0.85x (0.79-0.86), batch 1 the same picks.
MATVEC_COSTS = {ORDER_NATIVE: (6000.0, 0.2, 0.38), ORDER_DENSE: (9000.0, 0.05, 44000.0, 0.17, 0.012)}


def _is_matvec(problem: dict) -> bool:
    """The problem (:func:`cost_terms`'s arguments) is a pointwise SP conv on single-position maps."""
    return (problem.get("K") == 1 and problem.get("p_in") == 1 and problem.get("p_out") == 1
            and problem.get("identity", False) and not problem.get("transposed", False))


def _matvec_costs(problem: dict, itemsize: int) -> dict[int, float]:
    """Predicted nanoseconds of the native and the dense order for a matrix-vector problem (:data:`MATVEC_COSTS`)."""
    n, nnz = problem.get("batch", 1), problem["nnz"]
    weights = problem["c_out"] * (problem["c_in"] // problem.get("groups", 1))
    a, b, c = MATVEC_COSTS[ORDER_NATIVE]
    d, e, f, h, g = MATVEC_COSTS[ORDER_DENSE]
    scale = itemsize / 4.0
    return {ORDER_NATIVE: a + scale * (b * nnz if n == 1 else c * n * nnz),
            ORDER_DENSE: (d + scale * e * weights) if n == 1 else (f + scale * (h * weights + g * n * weights))}


try:  # the name as CPython's ``os.environ`` keys its mapping (bytes on POSIX, upper case on Windows)
    _AUTOTUNE_KEY = os.environ.encodekey("IPFX_AUTOTUNE")
except AttributeError:  # (another implementation of os.environ: then it is asked in the ordinary way)
    _AUTOTUNE_KEY = None


def autotune_setting():
    """``IPFX_AUTOTUNE`` as set now: a value that differs whenever the setting does, or None when it is unset.

    Read on every call of a fused conv (a plan is made per setting, so setting it mid-process takes effect
    on the next call). ``os.environ.get`` encodes the name and, when it is unset, raises and catches a
    ``KeyError`` inside: 1.1 us by itself, and 5-8 us of a 150-us depthwise conv when it ran between two such
    convs (the code it runs pushes the conv's out of the caches). So the mapping that ``os.environ`` reads and
    writes (CPython's ``os._Environ._data``) is looked up directly where it exists: the value as stored there
    (bytes on POSIX), which changes exactly when ``os.environ.get``'s does."""
    data = getattr(os.environ, "_data", None)
    if _AUTOTUNE_KEY is None or type(data) is not dict:
        return os.environ.get("IPFX_AUTOTUNE")
    return data.get(_AUTOTUNE_KEY)


def autotune_requested() -> bool:
    """``IPFX_AUTOTUNE`` set to 1/true/yes: ``order=0`` times the orders instead of using the cost model."""
    return os.environ.get("IPFX_AUTOTUNE", "").strip().lower() in ("1", "true", "yes", "on")


def cost_terms(
    *,
    c_in: int,
    c_out: int,
    K: int,
    nnz: int,
    p_in: int,
    p_out: int,
    batch: int = 1,
    groups: int = 1,
    transposed: bool = False,
    cheap_identity: bool = False,
    identity: bool = False,
    itemsize: int = 4,
    width: int = 0,
    direct: bool = False,
    folded: bool = False,
) -> dict[int, tuple[float, ...]]:
    """The work terms (``COST_TERMS``, without scaling) of each order; see the module docstring.

    ``identity``: the basis is the identity (SP); ``cheap_identity``: besides, order (a)'s basis stage is a copy.
    ``width``: the innermost output size (0: ``p_out``, a 1-d conv). ``direct``: the native kernel runs this
    grouped SP conv directly (:func:`ipfx.ops.native.direct_applies`), a group at a time from a padded copy
    in cache: its terms are that one copy of the input (maps ``N c_in P_in``), the sparse MACs (``N nnz
    P_out``) and the row visits (``N c_out ceil(P_out / 64)``); no gathered taps or runs. (An ungrouped SP
    conv that runs directly is still costed by the gather's terms, an upper bound, until the constants are
    refitted.) ``folded``: the native kernel runs the folded kernel of a grouped conv with a basis
    (:func:`ipfx.ops.kernels.folds_in_native`): its terms are the SP terms of :func:`folded_nnz` nonzeros.
    """
    if folded:
        return {**cost_terms(c_in=c_in, c_out=c_out, K=K, nnz=nnz, p_in=p_in, p_out=p_out, batch=batch,
                             groups=groups, transposed=transposed, cheap_identity=cheap_identity,
                             identity=identity, itemsize=itemsize, width=width),
                ORDER_NATIVE: cost_terms(c_in=c_in, c_out=c_out, K=K, nnz=folded_nnz(c_in, c_out, K, nnz, groups),
                                         p_in=p_in, p_out=p_out, batch=batch, groups=groups, identity=True,
                                         itemsize=itemsize, width=width, direct=direct)[ORDER_NATIVE]}
    n = batch
    pb = p_in if transposed else p_out
    dense_macs = n * c_out * (c_in // groups) * K * pb
    io = n * (c_in * p_in + c_out * p_out)
    per_row = c_out // groups  # coefficients that may read one basis-response row
    density = min(1.0, nnz / max(1, c_out * (c_in // groups) * K))
    used = c_in * K * (1.0 - (1.0 - density) ** per_row)
    taps = n * K * p_out
    tile = tile_for(c_in, K, itemsize)
    tiles = -(-p_out // tile)
    rows = n * c_out * tiles
    segments = -(-tile // max(1, min(width or p_out, p_out))) + 1
    gathered = used if identity else c_in * K
    runs = n * gathered * tiles * segments
    if direct:  # tiles of 64 positions of the output grid (about the output)
        native = (1.0, 0.0, n * c_in * p_in, n * nnz * p_out, 0.0, 0.0, 0.0, 0.0, n * c_out * -(-p_out // 64), 0.0)
    elif identity:
        native = (1.0, 0.0, n * used * p_out, n * nnz * p_out, 0.0, 0.0, 0.0, taps, rows, runs)
    else:
        native = (1.0, n * used * K * p_out, n * c_in * K * p_out, n * nnz * p_out, 0.0, 0.0, 0.0, taps, rows, runs)
    grouped = groups > 1
    return {
        ORDER_NATIVE: native,
        ORDER_BASIS_FIRST: (1.0, 0.0 if cheap_identity else n * c_in * K * K * pb, n * c_in * K * p_out,
                            n * nnz * p_out, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        ORDER_COEFF_FIRST: (1.0, n * c_out * K * K * pb, n * c_out * K * p_in, n * nnz * p_in, 0.0, 0.0, 0.0, 0.0,
                            0.0, 0.0),
        ORDER_DENSE: (1.0, 0.0, 0.0, 0.0, 0.0 if grouped else dense_macs, dense_macs if grouped else 0.0, io, 0.0,
                      0.0, 0.0),
    }


def folded_nnz(c_in: int, c_out: int, K: int, nnz: int, groups: int) -> int:
    """The expected nonzeros of a folded kernel ``W = C @ B`` (a basis spreads a coupled pair's coefficients
    over all ``K`` taps) for ``nnz`` coefficients spread uniformly over ``C``'s ``c_out * c_in/groups``
    pairs of ``K``: ``K`` for each pair that keeps at least one. A function of the problem alone (not of
    where the coefficients are), so the choice it feeds stays deterministic."""
    pairs = c_out * (c_in // groups)
    density = min(1.0, nnz / max(1, pairs * K))
    return int(round(pairs * K * (1.0 - (1.0 - density) ** K)))


def order_costs(*, itemsize: int = 4, native: bool = False, constants: dict | None = None,
                **problem) -> dict[int, float]:
    """Predicted nanoseconds of every order allowed for ``problem`` (the arguments of :func:`cost_terms`).

    ``native``: the native kernel may run (CPU, float32/64, built). Orders over the maps budget are left
    out; a matrix-vector product has the native and the dense order only, costed by :data:`MATVEC_COSTS`. Pure
    arithmetic: the same arguments give the same numbers.
    """
    constants = COST_CONSTANTS if constants is None else constants
    terms = cost_terms(itemsize=itemsize, **problem)
    scale = itemsize / 4.0
    io = terms[ORDER_DENSE][6]
    costs = {}
    for order, row in terms.items():
        if order not in constants or (order == ORDER_NATIVE and not native):
            continue
        if order in (ORDER_BASIS_FIRST, ORDER_COEFF_FIRST) and row[2] > MAPS_BUDGET * io:  # maps too large
            continue
        c = constants[order]
        costs[order] = c[0] + scale * sum(k * t for k, t in zip(c[1:], row[1:]))
    if ORDER_NATIVE in costs and _is_matvec(problem):
        return _matvec_costs(problem, itemsize)
    return costs


def choose_order(*, itemsize: int = 4, native: bool = False, constants: dict | None = None, **problem) -> int:
    """The order with the lowest predicted cost (:func:`order_costs`); ties go to the lower order number.

    ``problem``: ``c_in, c_out, K, nnz, p_in, p_out`` and optionally ``batch`` (1), ``groups`` (1),
    ``transposed`` (False), ``identity`` (False: the identity basis, SP), ``cheap_identity`` (False:
    identity basis on an ordinary 1-d/2-d conv, whose order (a) basis stage is a copy).
    """
    costs = order_costs(itemsize=itemsize, native=native, constants=constants, **problem)
    return min(sorted(costs), key=lambda order: costs[order])


def _problem(g: dict, x: Tensor, values: Tensor, basis, out_spatial) -> dict:
    """The arguments of :func:`cost_terms` for one call (``x`` batched)."""
    folded = folds_in_native(g, basis)  # (then on the direct path)
    nnz = values.numel()
    direct = g["groups"] > 1 and (folded or direct_applies(g, nnz, basis, out_spatial))
    return dict(c_in=g["c_in"], c_out=g["c_out"], K=g["K"], nnz=nnz, p_in=math.prod(x.shape[2:]),
                p_out=math.prod(out_spatial), batch=x.shape[0], groups=g["groups"], transposed=g["transposed"],
                identity=basis is None, cheap_identity=_identity_unfold_applies(g, basis is None),
                width=int(out_spatial[-1]), direct=direct, folded=folded)


def _modelled_order(g: dict, x: Tensor, values: Tensor, basis, out_spatial, native: bool) -> int:
    return choose_order(itemsize=x.element_size(), native=native, **_problem(g, x, values, basis, out_spatial))


_RUNNERS = {ORDER_BASIS_FIRST: _order_a, ORDER_COEFF_FIRST: _order_b, ORDER_DENSE: _order_dense,
            ORDER_NATIVE: _order_native, ORDER_GPU: _order_gpu}


def _candidates(g: dict, x: Tensor, values: Tensor, basis, out_spatial, native: bool = False,
                gpu: bool = False) -> dict:
    """The orders worth timing under ``ORDER_TUNED``: those the cost model allows (the maps budget) whose
    multiply-accumulates stay within 4x the dense conv's, and the Triton kernel where ``gpu``."""
    terms = cost_terms(itemsize=x.element_size(), **_problem(g, x, values, basis, out_spatial))
    allowed = order_costs(itemsize=x.element_size(), native=native, **_problem(g, x, values, basis, out_spatial))
    dense_macs = terms[ORDER_DENSE][4] + terms[ORDER_DENSE][5]
    chosen = {order: _RUNNERS[order] for order in sorted(allowed)
              if order in (ORDER_DENSE, ORDER_NATIVE) or terms[order][1] + terms[order][3] <= 4 * dense_macs}
    if gpu:
        chosen[ORDER_GPU] = _RUNNERS[ORDER_GPU]
    return chosen


def _measured_order(g: dict, x: Tensor, values, indices, flat, basis, out_spatial, native: bool = False,
                    gpu: bool = False) -> int:
    """``ORDER_TUNED``: the fastest candidate order for this storage and input shape, timed once.

    The first call with a new input shape runs every candidate order twice (a warm-up that builds its
    sparse matrix or dense weight, then a timed run; see :func:`_candidates`) and remembers the winner;
    later calls go straight to it. Without a cache (storage that cannot be weakly referenced) the cost
    model decides.
    """
    entry = _storage_entry(indices)
    key = (tuple(x.shape), x.dtype, x.device, tensor_state(values), tensor_state(indices), native, gpu)
    hit = entry.get("order")
    if hit is not None and hit[0] == key:
        return hit[1]
    ref = _MATRICES.get(id(indices), (None, None))[0]
    if ref is None or ref() is not indices:  # nowhere to remember a measurement: the model instead
        return _modelled_order(g, x, values, basis, out_spatial, native)
    timings = {}
    sync = functools.partial(torch.cuda.synchronize, x.device) if x.device.type == "cuda" else (lambda: None)
    for order, run in _candidates(g, x, values, basis, out_spatial, native, gpu).items():
        run(g, x, values, indices, flat, basis, out_spatial)
        sync()
        start = time.perf_counter()
        run(g, x, values, indices, flat, basis, out_spatial)
        sync()
        timings[order] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    entry["order"] = (key, best)
    return best


def resolve_order(order: int, g: dict, x: Tensor, values: Tensor, indices: Tensor, flat, basis,
                  out_spatial, allow_native: bool = False) -> int:
    """The concrete order (a key of ``_RUNNERS``) that ``order`` means for this call (``x`` batched).

    ``allow_native``: the caller is the op's kernel for ``x``'s device, which may run that device's own
    kernel: the native one on CPU where it supports ``x`` (:func:`ipfx.ops.native.supports`), the Triton
    one on CUDA (:func:`ipfx.ops.gpu.supports`). An explicit ``ORDER_NATIVE``/``ORDER_GPU`` that cannot
    run falls back to ``order=0``. On CUDA ``order=0`` is a rule of the folded kernel's density
    (:data:`GPU_DENSITY_MAX`: cuDNN's dense conv unless nothing is kept), the CPU cost model's constants being
    CPU measurements.
    """
    if order not in (ORDER_TUNED, ORDER_AUTO, *_RUNNERS):
        raise IPFXValueError(
            f"order must be 0 (auto: cost model), -1 (tuned: timed once), 1 (basis first), 2 (coefficients "
            f"first), 3 (dense), 4 (native, CPU) or 5 (Triton, CUDA), got {order}"
        )
    own = _own_kernel(g, x) if allow_native and order in (ORDER_AUTO, ORDER_TUNED, ORDER_NATIVE, ORDER_GPU) else None
    native = own == ORDER_NATIVE
    if order in (ORDER_NATIVE, ORDER_GPU) and own != order:
        order = ORDER_AUTO
    if order == ORDER_AUTO and autotune_requested():
        order = ORDER_TUNED
    if order == ORDER_TUNED:
        return _measured_order(g, x, values, indices, flat, basis, out_spatial, native, gpu=own == ORDER_GPU)
    if order == ORDER_AUTO and own == ORDER_GPU:
        from . import gpu

        return ORDER_GPU if gpu.folded_density(g, values, indices, flat, basis) <= GPU_DENSITY_MAX else ORDER_DENSE
    if order == ORDER_AUTO:  # a pure function of its key, remembered per storage (the arithmetic costs ~30 us)
        key = (tuple(x.shape), tuple(out_spatial), tuple(g["weight_shape"]), g["groups"], g["transposed"], x.dtype,
               native, basis is None, values.numel())
        hit = _storage_entry(indices).get("auto")
        if hit is not None and hit[0] == key:
            return hit[1]
        chosen = _modelled_order(g, x, values, basis, out_spatial, native)
        _storage_entry(indices)["auto"] = (key, chosen)
        return chosen
    return order


def _own_kernel(g: dict, x: Tensor) -> int | None:
    """The order of the kernel made for ``x``'s device, where it can take ``x``: native (CPU) or Triton (CUDA)."""
    if x.device.type == "cpu":
        from . import native

        return ORDER_NATIVE if native.supports(x) else None
    if x.device.type == "cuda":
        from . import gpu

        return ORDER_GPU if gpu.supports(x) and gpu.fits(g, x) else None
    return None
