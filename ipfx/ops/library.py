"""Registration of the fused ops as ``torch.library`` custom ops: ``ipfx::ip_conv`` and ``ipfx::sparse_linear``.

Each op has a real kernel (argument checks, then the order chosen by :mod:`ipfx.ops.order` running a kernel
of :mod:`ipfx.ops.kernels`), registered for every device; a CPU kernel that may also run the native tiled
kernel (:mod:`ipfx.ops.native`, built on first use; the torch orders where it cannot be built); for
``ip_conv`` a CUDA kernel that may also run the Triton kernel (:mod:`ipfx.ops.gpu`; ``sparse_linear`` on
CUDA is cuSPARSE's CSR product through ``torch.sparse``); a fake
kernel (shape inference only, so ``torch.export`` and ``torch.compile`` see one op); and an autograd formula
that raises: the ops are inference-only.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from ..errors import IPFXValueError
from . import epilogue, native
from .geometry import _check_index_range, _check_linear, _conv_geometry, _output_spatial
from .kernels import _CONV, _CONV_T, _dense_conv_partial, _dense_weight, _native_conv_operands, _spmm, conv_layout
from .order import _RUNNERS, ORDER_DENSE, ORDER_GPU, ORDER_NATIVE, autotune_setting, resolve_order
from .storage import _cached, _sparse_matrix, _storage_entry, built_without_autocast, tensor_state


_INFERENCE_ONLY = (
    "{op} is an inference-only op (it has no autograd formula). Train with the dense/reparametrised "
    "model, or run this module under torch.no_grad()/torch.inference_mode()."
)


def _unaliased(y: Tensor) -> Tensor:
    """``y`` as a tensor of its own where a kernel returns a view of its own intermediate (a 2-d linear output
    reshaped, an unbatched conv's ``squeeze``): an op's output may be written in place by what follows
    (``hardswish(inplace=True)``), and under autograd a view made inside a custom op may not be (torch raised
    "Output 0 of GeneratedBackwardFor_ipfx_sparse_linear_default is a view and is being modified inplace" on
    the forward). ``aten._unsafe_view`` is how aten's own ops return such results (``linear`` on 3-d inputs):
    the same memory, no copy, and no view for autograd."""
    return y if y._base is None else torch.ops.aten._unsafe_view(y, y.shape)


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
    residual: Optional[Tensor] = None,
    activation: str = "none",
) -> Tensor:
    """Convolution with kernel ``W = reshape(C @ basis, weight_shape)``, ``C`` given sparsely, computed by linearity.

    Equals ``F.conv{d}d(x, W, bias, stride, padding, dilation, groups)`` (``transposed=False``,
    ``W: (c_out, c_in/groups, *k)``) or ``F.conv_transpose{d}d(x, W, bias, stride, padding, output_padding,
    groups, dilation)`` (``transposed=True``, ``W: (c_in, c_out/groups, *k)``) without ever forming ``W``.

    ``values``/``indices``: nonzeros of ``C`` (shape ``(w0, w1, K)``) and their flat indices (int32/int64;
    repeats are summed). ``basis``: ``(K, K)``, row j = filter F_j flattened, or None for the identity.
    ``padding`` is symmetric zero padding (ints). ``order``: 0 = chosen by the cost model (deterministic;
    :mod:`ipfx.ops.order`), -1 = fastest by timing, measured once per storage and input shape (also what 0
    means under ``IPFX_AUTOTUNE=1``), 1 = basis first, 2 = coefficients first, 3 = dense, 4 = native (CPU,
    float32/64, where the kernel is built; else the cost model's choice), 5 = Triton (CUDA, float16/bfloat16/
    float32, where Triton is; else ``order=0``). ``values``, ``basis`` and
    ``bias`` are cast to ``x.dtype``. Input is (N, C, *spatial) or unbatched (C, *spatial).

    The epilogue (:mod:`ipfx.ops.epilogue`): the op returns ``act(conv + bias + residual)``, ``+`` torch's
    broadcasting addition, ``residual`` a tensor or None and ``activation`` one of ``none, relu, relu6,
    silu, gelu, hardswish``; the native kernel applies it while each tile is in registers where the
    residual has the output's shape and dtype.
    """
    g = _conv_geometry(
        x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding
    )
    return _unaliased(_run_ip_conv(g, x, values, indices, basis, bias, order, residual=residual,
                                   activation=activation))


@ip_conv.register_kernel(("cpu", "cuda"))
def _ip_conv_own_device(
    x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding, order,
    residual=None, activation="none",
):
    """The CPU and CUDA kernels: as the default one, and the device's own kernel may run (native on CPU,
    :mod:`ipfx.ops.native`; Triton on CUDA, :mod:`ipfx.ops.gpu`). Planned once per storage and kind of input
    (:func:`conv_plan`), so a deployed program (a loaded ``.pt2``, a graph compiled by ``torch.compile``) pays the
    per-call work once, as the modules' eager path does."""
    plan = conv_plan(x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed,
                     output_padding, order, activation)
    # (contiguous: the fake kernel's layout, by which Inductor lays out what follows)
    return _unaliased(plan(x, residual).contiguous())


def _run_ip_conv(g: dict, x: Tensor, values: Tensor, indices: Tensor, basis: Optional[Tensor],
                 bias: Optional[Tensor], order: int, allow_native: bool = False, residual: Optional[Tensor] = None,
                 activation: str = "none") -> Tensor:
    """The body of ``ip_conv`` once the geometry ``g`` (:func:`_conv_geometry`) is known.

    ``allow_native``: the device's own kernel may run (native on CPU, Triton on CUDA: the op's CPU and CUDA
    kernels, and the modules' eager path). ``residual``, ``activation``: the epilogue (:mod:`.epilogue`).
    """
    epilogue.check(activation)
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
    order = resolve_order(order, g, x, values, indices, flat, basis, out_spatial, allow_native)
    if unbatched and residual is not None and residual.dim() == g["d"] + 1:
        residual = residual.unsqueeze(0)  # (a residual of fewer dims broadcasts as it is)
    if order == ORDER_NATIVE and epilogue.in_kernel(residual, (x.shape[0], g["c_out"], *out_spatial), x.dtype):
        y = _RUNNERS[order](g, x, values, indices, flat, basis, out_spatial, bias, residual,
                            epilogue.code(activation))  # bias and epilogue in the kernel
        residual, activation, bias = None, "none", None
    elif order in (ORDER_NATIVE, ORDER_DENSE, ORDER_GPU):  # these add the bias themselves
        y = _RUNNERS[order](g, x, values, indices, flat, basis, out_spatial, bias)
        bias = None
    else:
        y = _RUNNERS[order](g, x, values, indices, flat, basis, out_spatial)
    if bias is not None:
        y = y + bias.to(dtype=y.dtype, device=y.device).reshape(1, -1, *([1] * g["d"]))
    if not epilogue.is_identity(residual, activation):
        y = epilogue.apply(y, residual, activation)
    if unbatched and y.dim() == g["d"] + 2:
        y = y.squeeze(0)
    return y.contiguous()


#: Plans kept per sparse storage, one per kind of input (shape, dtype, order, activation, ...); a storage
#: called with more kinds (a head shared by the levels of a feature pyramid) drops its oldest plan.
PLANS_PER_STORAGE = 8


def _planned(indices: Tensor, kind: tuple, state: tuple, build, keep: tuple):
    """The plan ``build()`` made for inputs of ``kind`` and the stored tensors' ``state`` (each one's identity,
    in-place version and data address: :func:`ipfx.ops.storage.tensor_state`), kept beside the matrices of the storage of ``indices`` (:func:`ipfx.ops.storage.
    _storage_entry`, dropped with that tensor). A new state drops the plans of the old one (a version never
    comes back). ``keep``: the tensors whose identity ``state`` names, held with the plan so that no other
    tensor takes their ``id`` while it lives."""
    plans = _storage_entry(indices).setdefault("plans", {})
    hit = plans.get((kind, state))
    if hit is not None:
        return hit[0]
    for stale in [key for key in list(plans) if key[1] != state]:
        plans.pop(stale, None)  # (pop: another thread calling the same model may have dropped it already)
    for oldest in list(plans)[:max(0, len(plans) + 1 - PLANS_PER_STORAGE)]:
        plans.pop(oldest, None)
    plan = built_without_autocast(build)
    plans[(kind, state)] = (plan, keep)
    return plan


def conv_plan_key(x: Tensor, values: Tensor, indices: Tensor, basis: Optional[Tensor], bias: Optional[Tensor],
                  weight_shape, stride, padding, dilation, groups: int, transposed: bool, output_padding, order: int,
                  activation: str) -> tuple[tuple, tuple]:
    """What a conv plan (:func:`conv_plan`) is made for, as ``(kind, state)``: the kind of input, order,
    ``IPFX_AUTOTUNE``, activation and geometry (copied: a list changed in place later is not the same key),
    and the stored tensors' states (:func:`ipfx.ops.storage.tensor_state`). Kept per storage of ``indices``; a module that
    keeps its last plan compares this with the storage's identity added (:class:`ipfx.ops.SparseIPConv`)."""
    kind = ("conv", x.shape, x.dtype, x.device, conv_layout(x), order, activation, autotune_setting(),
            tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), groups, transposed,
            tuple(output_padding))
    return kind, (tensor_state(values), tensor_state(indices), tensor_state(basis), tensor_state(bias))


#: Float dtypes the CPU plans compute in float32, rounding once, at the output (the native kernel takes float32
#: and float64 only). Computed in the input's dtype, a bfloat16 resnet18 lowered to the fused form was 3.5e-2 off
#: its float64 result (relative to the largest output) where its dense lowering (aten's convs) was 9.9e-3 off,
#: and one 64-channel 3x3 layer in order (a) 14x further off than the dense conv (float16: 5.6e-3 against 1.4e-3
#: for the resnet18); in float32 9.3e-3 (float16 1.9e-3).
WIDENED_ON_CPU = (torch.float16, torch.bfloat16)


def _computed_wider(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in WIDENED_ON_CPU


def _narrowed(wide, dtype: torch.dtype):
    """A float32 plan run on an input of ``dtype`` (:data:`WIDENED_ON_CPU`): ``act(conv + bias + residual)``
    computed in float32 and rounded to what the op returns, ``dtype`` or, with a residual of another dtype, the
    two promoted (as ``+`` promotes). A residual of ``dtype`` goes in widened too (the kernel's epilogue takes
    its own dtype only)."""

    def run(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if residual is None:
            return wide(x.float()).to(dtype)
        if residual.dtype == dtype:
            return wide(x.float(), residual.float()).to(dtype)
        return wide(x.float(), residual).to(torch.promote_types(dtype, residual.dtype))

    return run


def conv_plan(x: Tensor, values: Tensor, indices: Tensor, basis: Optional[Tensor], bias: Optional[Tensor],
              weight_shape, stride, padding, dilation, groups: int, transposed: bool, output_padding, order: int,
              activation: str = "none"):
    """``ip_conv`` for inputs like ``x`` and this storage as ``run(x, residual=None) -> y``: the argument checks,
    the order choice and the kernel's operands worked out once, then kept per storage (:func:`_planned`).

    The same kernels with the same arguments as :func:`_run_ip_conv` (so the same numbers). A new plan where
    the input's shape, dtype or device, the order, ``IPFX_AUTOTUNE``, the activation, the geometry, or a
    stored tensor (identity, or in-place version) differs. Used by the op's CPU/CUDA kernel and by
    :class:`ipfx.ops.modules.SparseIPConv` in eager inference. A float16/bfloat16 input on CPU runs the float32
    plan (:data:`WIDENED_ON_CPU`, :func:`_narrowed`).
    """
    kind, state = conv_plan_key(x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups,
                                transposed, output_padding, order, activation)
    return _planned(indices, kind, state, lambda: _build_conv_plan(
        x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding,
        order, activation), (values, basis, bias))


def _build_conv_plan(x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed,
                     output_padding, order, activation):
    if _computed_wider(x):  # (kept as this input's plan: the float copy of x made here, once)
        wide = conv_plan(x.float(), values, indices, basis, bias, weight_shape, stride, padding, dilation, groups,
                         transposed, output_padding, order, activation)
        return _narrowed(wide, x.dtype)
    epilogue.check(activation)
    g = _conv_geometry(x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed,
                       output_padding)
    own = x.device.type in ("cpu", "cuda")
    try:  # the plan lives beside the storage of ``indices``: it must not keep that tensor alive
        storage = weakref.ref(indices)
    except TypeError:  # (not weakly referable: then nothing is cached, and a strong reference is harmless)
        storage = lambda: indices  # noqa: E731

    def generic(x, residual=None, order=order):
        return _run_ip_conv(g, x, values, storage(), basis, bias, order, allow_native=own, residual=residual,
                            activation=activation)

    batched = x if x.dim() == g["d"] + 2 else x.unsqueeze(0)
    out_spatial = _output_spatial(g, batched.shape[2:])
    _check_index_range(indices, math.prod(g["weight_shape"]))
    if any(s <= 0 for s in out_spatial):  # the generic path raises the error
        return generic
    flat = lambda: indices.to(device=x.device, dtype=torch.int64)  # noqa: E731  (while planning only)
    resolved = resolve_order(order, g, batched.contiguous(), values, indices, flat, basis, out_spatial,
                             allow_native=own)

    def run_generic(x, residual=None):
        return generic(x, residual, resolved)

    b = None if bias is None else bias.to(dtype=x.dtype, device=x.device)
    unbatched = x.dim() == g["d"] + 1
    out_shape = (g["c_out"], *out_spatial) if unbatched else (x.shape[0], g["c_out"], *out_spatial)
    if resolved == ORDER_DENSE:  # the dense conv itself, bound
        conv = _dense_conv_partial(g, _dense_weight(g, values, indices, flat, basis, x), b)

        def run_dense(x, residual=None):
            if residual is None and activation == "none":
                return conv(x)
            return epilogue.apply(conv(x), residual, activation)

        return run_dense
    if resolved != ORDER_NATIVE:
        return run_generic
    crow, col, vals, used, nb, direct = _native_conv_operands(g, values, indices, flat, basis, x)
    kernel = native.bind_conv(crow, col, vals, nb, None if b is None else b.contiguous(), used, g, out_spatial,
                              x.element_size(), batched.shape[2:], direct)
    code = epilogue.code(activation)

    def run_native(x, residual=None):
        if residual is None:
            if unbatched:
                return kernel(x.unsqueeze(0).contiguous(), None, code).squeeze(0)
            return kernel(x.contiguous(), None, code)
        if not epilogue.in_kernel(residual, out_shape, x.dtype):
            return run_generic(x, residual)
        residual = (residual.unsqueeze(0) if unbatched else residual).contiguous()
        y = kernel(x.unsqueeze(0).contiguous() if unbatched else x.contiguous(), residual, code)
        return y.squeeze(0) if unbatched else y

    if not unbatched:  # what a native program (ipfx.ops.program) calls in this plan's place
        run_native.bound = (kernel, code, out_shape)
    return run_native


@ip_conv.register_fake
def _ip_conv_fake(
    x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding, order,
    residual=None, activation="none",
):
    g = _conv_geometry(
        x, values, indices, basis, bias, weight_shape, stride, padding, dilation, groups, transposed, output_padding
    )
    # Shape inference by the dense conv itself on fake tensors (handles symbolic shapes and unbatched input).
    w = x.new_empty(g["weight_shape"])
    if g["transposed"]:
        y = _CONV_T[g["d"]](x, w, None, g["stride"], g["padding"], g["output_padding"], g["groups"], g["dilation"])
    else:
        y = _CONV[g["d"]](x, w, None, g["stride"], g["padding"], g["dilation"], g["groups"])
    epilogue.check(activation)
    return y if residual is None else epilogue.apply(y, residual, activation)


def _no_backward_conv(ctx, grad):
    raise RuntimeError(_INFERENCE_ONLY.format(op="ipfx::ip_conv"))


ip_conv.register_autograd(_no_backward_conv)


@torch.library.custom_op("ipfx::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], weight_shape: list[int]
) -> Tensor:
    """``F.linear(x, W, bias)`` with ``W`` (out, in) stored as nonzeros: ``W.view(-1)[indices] += values``.

    Computed as ``y^T = W @ x^T`` with ``W`` a sparse CSR (or COO) matrix (memory O(nnz)), on CPU by the
    native kernel where it is available; ``x`` may have any leading dims. ``values``/``bias`` are cast to
    ``x.dtype``.
    """
    return _unaliased(_run_sparse_linear(x, values, indices, bias, weight_shape, allow_native=False))


@sparse_linear.register_kernel("cpu")
def _sparse_linear_cpu(x, values, indices, bias, weight_shape):
    return _unaliased(_run_sparse_linear(x, values, indices, bias, weight_shape, allow_native=True))


def _run_sparse_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], weight_shape,
                       allow_native: bool) -> Tensor:
    return sparse_linear_plan(x, values, indices, bias, weight_shape, allow_native)(x)


def sparse_linear_plan_key(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], weight_shape,
                           allow_native: bool) -> tuple[tuple, tuple]:
    """What a linear plan (:func:`sparse_linear_plan`) is made for, as ``(kind, state)`` (as
    :func:`conv_plan_key`)."""
    kind = ("linear", x.shape, x.dtype, x.device, allow_native, tuple(weight_shape))
    return kind, (tensor_state(values), tensor_state(indices), tensor_state(bias))


def sparse_linear_plan(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], weight_shape,
                       allow_native: bool):
    """:func:`_sparse_linear_plan`, kept per storage and kind of input (:func:`_planned`; as :func:`conv_plan`,
    computed in float32 for :data:`WIDENED_ON_CPU` inputs)."""
    kind, state = sparse_linear_plan_key(x, values, indices, bias, weight_shape, allow_native)
    return _planned(indices, kind, state,
                    lambda: _sparse_linear_plan(x, values, indices, bias, weight_shape, allow_native), (values, bias))


def _sparse_linear_plan(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], weight_shape,
                        allow_native: bool):
    """``sparse_linear`` for inputs like ``x`` (shape, dtype, device) and this storage, as ``run(x) -> y``: the
    checks, the sparse matrix and the kernel's choice made once (a deployed ``SparseLinear`` keeps it per
    input shape). ``allow_native``: the CPU kernel may run the native one (:mod:`ipfx.ops.native`)."""
    if _computed_wider(x):
        wide = sparse_linear_plan(x.float(), values, indices, bias, weight_shape, allow_native)
        return lambda x: wide(x.float()).to(x.dtype)
    out_f, in_f = _check_linear(x, values, indices, bias, weight_shape)
    _cached(_storage_entry(indices), "checked", (indices._version, out_f * in_f),
            lambda: _check_index_range(indices, out_f * in_f))
    lead = tuple(x.shape[:-1])

    def coords():
        flat = indices.to(device=x.device, dtype=torch.int64)
        return flat // in_f, flat % in_f

    matrix = _sparse_matrix(values, indices, "linear", (out_f, in_f), coords, x.reshape(-1, in_f).t())
    if allow_native and matrix.layout == torch.sparse_csr and native.supports(x):
        b = None if bias is None else bias.to(dtype=x.dtype).contiguous()
        crow, col, vals = matrix.crow_indices(), matrix.col_indices(), matrix.values()

        def run_native(x: Tensor) -> Tensor:
            return native.linear(x.reshape(-1, in_f).contiguous(), crow, col, vals, b).reshape(*lead, out_f)

        if x.dim() == 2:  # what a native program (ipfx.ops.program) calls for a contiguous x: ipfx_native::linear
            run_native.bound = (crow, col, vals, b)
        return run_native

    def run(x: Tensor) -> Tensor:
        y = _spmm(matrix, x.reshape(-1, in_f).t()).t()
        if bias is not None:
            y = y + bias.to(dtype=y.dtype, device=y.device)
        return y.reshape(*lead, out_f).contiguous()

    return run


@sparse_linear.register_fake
def _sparse_linear_fake(x, values, indices, bias, weight_shape):
    out_f, _ = _check_linear(x, values, indices, bias, weight_shape)
    return x.new_empty((*x.shape[:-1], out_f))


def _no_backward_linear(ctx, grad):
    raise RuntimeError(_INFERENCE_ONLY.format(op="ipfx::sparse_linear"))


sparse_linear.register_autograd(_no_backward_linear)
