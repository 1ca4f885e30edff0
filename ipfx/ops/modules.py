"""``nn.Module`` front ends of the fused ops: :class:`SparseIPConv` and :class:`SparseLinear`.

They hold the sparse storage (:mod:`ipfx.ops.storage`) as buffers and call ``torch.ops.ipfx.ip_conv`` /
``torch.ops.ipfx.sparse_linear`` (:mod:`ipfx.ops.library`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..form.compose import compose_weight
from ..errors import IPFXValueError
from .geometry import IntSeq, _check_index_range, _check_sparse_storage, _tuple
from .library import conv_plan, conv_plan_key, sparse_linear_plan, sparse_linear_plan_key
from .order import ORDER_AUTO
from .storage import _densify, sparse_coefficients


def _as_bias(bias: Optional[Tensor]) -> Optional[nn.Parameter]:
    if bias is None:
        return None
    # requires_grad=False: the op is inference-only.
    return nn.Parameter(bias.detach().clone(), requires_grad=False)


class _SparseStorageMixin:
    """state_dict loading for buffers whose length (nnz) is data dependent, and the module's last plan.

    A fresh module built from coefficients of the same shape generally has a different nnz; before the
    default (shape-checked) copy, ``values``/``indices`` are resized to the incoming tensors.

    The last plan (:meth:`_last_plan`) is kept in the module's ``__dict__`` with what it was made for; it is
    not state: pickling, copying, ``.to()``/``.float()`` (``_apply``) and ``load_state_dict`` leave it behind.
    """

    def _last_plan(self, token: tuple, build, keep: tuple):
        """The plan ``build()`` made for the same ``token`` on the last call, else a new one (kept for the next).

        ``token`` is the plan's key (:func:`ipfx.ops.library.conv_plan_key`, ``sparse_linear_plan_key``) and
        the storage's ``id``, compared with ``==`` (never tensors: the stored tensors enter by ``id`` and in-place
        version, and ``keep`` holds them, so no other tensor takes their ``id`` while the plan is kept). In a
        deployed model every call is like the last one, and then costs this comparison instead of the
        per-storage lookup (:func:`ipfx.ops.library._planned`: the key hashed and the storage's weak entry
        found), 4.6 us of every conv call before."""
        last = self.__dict__.get("_last_plan_memo")
        if last is not None and last[0] == token:
            return last[1]
        plan = build()
        self.__dict__["_last_plan_memo"] = (token, plan, keep)
        return plan

    def _as_ordinary_tensors(self) -> bool:
        """Replace the module's inference tensors (made inside ``torch.inference_mode``: a ``copy.deepcopy``, a
        ``.to(torch.float64)`` there) by ordinary copies of the same numbers; True where it replaced any. Plans
        are keyed on the stored tensors' in-place versions, which inference tensors do not have (the call raised
        torch's "Inference tensors do not track version counter")."""
        replaced = False
        with torch.inference_mode(False):
            for store in (self._buffers, self._parameters):
                for name, t in list(store.items()):
                    if isinstance(t, Tensor) and t.is_inference():
                        ordinary = t.clone()
                        if isinstance(t, nn.Parameter):
                            ordinary = nn.Parameter(ordinary, t.requires_grad)
                        store[name] = ordinary
                        replaced = True
            t = self.__dict__.get("bias")  # (a plain attribute)
            if isinstance(t, Tensor) and t.is_inference():
                self.__dict__["bias"], replaced = t.clone(), True
        return replaced

    def __getstate__(self):
        state = super().__getstate__()  # (nn.Module's: a copy, without what torch keeps out of it)
        state.pop("_last_plan_memo", None)
        return state

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_last_plan_memo", None)  # (the tensors it holds are about to be replaced)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.__dict__.pop("_last_plan_memo", None)  # (as in _apply: it would hold the replaced tensors)
        for name in ("values", "indices"):
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if incoming is None or current is None or incoming.shape == current.shape:
                continue
            dtype = incoming.dtype if name == "indices" else current.dtype
            self._buffers[name] = torch.empty(incoming.shape, dtype=dtype, device=current.device)
        if "indices" in self._buffers and prefix + "indices" in state_dict:
            incoming = state_dict[prefix + "indices"]
            if incoming.dtype != self._buffers["indices"].dtype:
                self._buffers["indices"] = self._buffers["indices"].to(incoming.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _bias(module: nn.Module) -> Optional[Tensor]:
    """``module.bias`` without ``nn.Module.__getattr__`` where it is a parameter (None too, once registered) or
    a plain attribute (0.9 us a read, on every call); anywhere else (a buffer, a parametrization's property)
    by the ordinary lookup."""
    parameters = module._parameters
    if "bias" in parameters:
        return parameters["bias"]
    state = module.__dict__
    return state["bias"] if "bias" in state else getattr(module, "bias", None)


def _eager_inference(x) -> bool:
    """Plain eager inference: a real tensor, no autograd, nothing tracing. The modules then run the ops'
    implementation directly (the op's dispatch and argument checks cost ~30 us a call, 5% of a batch-1
    resnet50); with autograd on (the ops raise on backward) or under torch.compile/export/fx they call the
    registered op, so graphs show ``ipfx::ip_conv`` and the inference-only guard stays. ``torch.jit.trace``
    counts as tracing: its graph records the op (a native call it cannot see would be a constant in it)."""
    return (type(x) is torch.Tensor and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and torch._C._get_tracing_state() is None)


class SparseIPConv(_SparseStorageMixin, nn.Module):
    """Inference conv whose kernel ``W = reshape(C @ basis, weight_shape)`` is stored as the nonzeros of ``C``.

    Buffers: ``values`` (nnz,), ``indices`` (nnz,) flat indices into ``C.reshape(-1)`` with
    ``C: (w0, w1, K)``, ``basis`` ((K, K) or None = identity); ``bias`` is a (frozen) parameter.
    Geometry attributes follow PyTorch: ``weight_shape`` is ``(c_out, c_in/groups, *k)`` or, for a
    transposed conv, ``(c_in, c_out/groups, *k)``. ``forward`` calls ``torch.ops.ipfx.ip_conv`` (order 0), or
    under ``torch.no_grad()`` in eager mode its implementation directly (:func:`_eager_inference`).
    """

    def __init__(
        self,
        values: Tensor,
        indices: Tensor,
        basis: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        *,
        weight_shape: Sequence[int],
        stride: IntSeq = 1,
        padding: IntSeq = 0,
        dilation: IntSeq = 1,
        groups: int = 1,
        transposed: bool = False,
        output_padding: IntSeq = 0,
    ) -> None:
        super().__init__()
        weight_shape = tuple(int(s) for s in weight_shape)
        if not 3 <= len(weight_shape) <= 5:
            raise IPFXValueError(f"weight_shape must be (w0, w1, *kernel) with 1-3 kernel dims, got {weight_shape}")
        d = len(weight_shape) - 2
        self.weight_shape = weight_shape
        self.stride = _tuple("stride", stride, d)
        self.padding = _tuple("padding", padding, d)
        self.dilation = _tuple("dilation", dilation, d)
        self.output_padding = _tuple("output_padding", output_padding, d)
        self.groups = int(groups)
        self.transposed = bool(transposed)
        _check_sparse_storage(values, indices)
        _check_index_range(indices, math.prod(weight_shape))
        K = math.prod(weight_shape[2:])
        if basis is not None and tuple(basis.shape) != (K, K):
            raise IPFXValueError(f"basis must have shape (K, K) = ({K}, {K}), got {tuple(basis.shape)}")
        self.register_buffer("values", values.detach().clone())
        self.register_buffer("indices", indices.detach().clone())
        self.register_buffer("basis", None if basis is None else basis.detach().clone())
        self.bias = _as_bias(bias)
        self.activation = "none"  # the epilogue's (ipfx.ops.epilogue); set by ipfx.lower(..., freeze=True)

    @classmethod
    def from_coefficients(
        cls,
        coeff: Tensor,
        basis: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        *,
        weight_shape: Sequence[int],
        stride: IntSeq = 1,
        padding: IntSeq = 0,
        dilation: IntSeq = 1,
        groups: int = 1,
        transposed: bool = False,
        output_padding: IntSeq = 0,
    ) -> "SparseIPConv":
        """Build from the dense, already masked coefficients ``coeff`` (shape (w0, w1, K)); keeps the nonzeros."""
        weight_shape = tuple(int(s) for s in weight_shape)
        expected = (*weight_shape[:2], math.prod(weight_shape[2:]))
        if tuple(coeff.shape) not in (expected, weight_shape):
            raise IPFXValueError(f"coeff must have shape {expected} for weight_shape {weight_shape}, got {tuple(coeff.shape)}")
        values, indices = sparse_coefficients(coeff)
        return cls(
            values,
            indices,
            basis,
            bias,
            weight_shape=weight_shape,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            transposed=transposed,
            output_padding=output_padding,
        )

    @property
    def nnz(self) -> int:
        return self.values.numel()

    # nn.ConvNd's names for the geometry, for code around the conv that reads them (a method of the module
    # it sits in, say, run outside the graph)
    @property
    def in_channels(self) -> int:
        w0, w1 = self.weight_shape[:2]
        return w0 if self.transposed else w1 * self.groups

    @property
    def out_channels(self) -> int:
        w0, w1 = self.weight_shape[:2]
        return w1 * self.groups if self.transposed else w0

    @property
    def kernel_size(self) -> tuple:
        return tuple(self.weight_shape[2:])

    def coefficients(self) -> Tensor:
        """Dense ``C`` of shape (w0, w1, K)."""
        w0, w1 = self.weight_shape[:2]
        K = math.prod(self.weight_shape[2:])
        return _densify(self.values, self.indices, w0 * w1 * K).reshape(w0, w1, K)

    def to_dense_weight(self) -> Tensor:
        """``W = reshape(C @ basis, weight_shape)`` (basis None = identity)."""
        c = self.coefficients()
        basis = None if self.basis is None else self.basis.to(c.dtype)
        return compose_weight(c, None, basis, self.weight_shape, basis is not None)

    def forward(self, x: Tensor, order: int = ORDER_AUTO, residual: Optional[Tensor] = None) -> Tensor:
        """``act(conv(x, W) + bias + residual)``, ``act`` the module's ``activation`` (the op's epilogue)."""
        activation = self.__dict__.get("activation", "none")  # (modules pickled before the epilogue existed)
        if _eager_inference(x) and (residual is None or type(residual) is torch.Tensor):
            return self._plan(x, order, activation)(x, residual)
        return torch.ops.ipfx.ip_conv(
            x,
            self.values,
            self.indices,
            self.basis,
            self.bias,
            list(self.weight_shape),
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.groups,
            self.transposed,
            list(self.output_padding),
            order,
            residual,
            activation,
        )

    def _plan(self, x: Tensor, order: int, activation: str = "none"):
        """The computation for inputs like ``x`` in eager inference, worked out once per input shape and storage
        (:func:`ipfx.ops.library.conv_plan`, which the op's own kernel uses too), called as ``plan(x, residual)``;
        the last one kept on the module (:meth:`_last_plan`) for the same key (:func:`ipfx.ops.library.
        conv_plan_key`) and storage."""
        buffers = self._buffers
        values, indices, basis, bias = buffers["values"], buffers["indices"], buffers["basis"], _bias(self)
        geometry = (self.weight_shape, self.stride, self.padding, self.dilation, self.groups, self.transposed,
                    self.output_padding)
        try:
            token = (id(indices), conv_plan_key(x, values, indices, basis, bias, *geometry, order, activation))
        except RuntimeError:
            if not self._as_ordinary_tensors():
                raise
            return self._plan(x, order, activation)
        return self._last_plan(token, lambda: conv_plan(x, values, indices, basis, bias, *geometry, order, activation),
                               (values, indices, basis, bias))

    def extra_repr(self) -> str:
        total = math.prod(self.weight_shape)
        s = (
            f"weight_shape={self.weight_shape}, nnz={self.nnz}/{total} ({100.0 * self.nnz / total:.1f}%), "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"transposed={self.transposed}"
        )
        if self.transposed and any(self.output_padding):
            s += f", output_padding={self.output_padding}"
        s += f", basis={'identity' if self.basis is None else tuple(self.basis.shape)}, bias={self.bias is not None}"
        activation = self.__dict__.get("activation", "none")
        return s if activation == "none" else s + f", activation={activation}"


class SparseLinear(_SparseStorageMixin, nn.Module):
    """Inference linear layer with ``W`` (out, in) stored as nonzeros (``values``, flat ``indices``)."""

    def __init__(self, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None, *, weight_shape: Sequence[int]):
        super().__init__()
        weight_shape = tuple(int(s) for s in weight_shape)
        if len(weight_shape) != 2:
            raise IPFXValueError(f"weight_shape must be (out_features, in_features), got {weight_shape}")
        _check_sparse_storage(values, indices)
        _check_index_range(indices, math.prod(weight_shape))
        self.weight_shape = weight_shape
        self.register_buffer("values", values.detach().clone())
        self.register_buffer("indices", indices.detach().clone())
        self.bias = _as_bias(bias)

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor] = None) -> "SparseLinear":
        """Build from a dense (already masked) weight (out, in); keeps the nonzeros."""
        if weight.dim() != 2:
            raise IPFXValueError(f"weight must be 2-d (out_features, in_features), got shape {tuple(weight.shape)}")
        values, indices = sparse_coefficients(weight)
        return cls(values, indices, bias, weight_shape=weight.shape)

    def to_dense_weight(self) -> Tensor:
        return _densify(self.values, self.indices, math.prod(self.weight_shape)).reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T + bias``: ``torch.ops.ipfx.sparse_linear``, or in eager inference (:func:`_eager_inference`)
        its implementation, planned once per input shape and storage (as :meth:`SparseIPConv._plan`)."""
        if not _eager_inference(x):
            return torch.ops.ipfx.sparse_linear(x, self.values, self.indices, self.bias, list(self.weight_shape))
        values, indices, bias = self._buffers["values"], self._buffers["indices"], _bias(self)
        allow_native = x.device.type == "cpu"
        try:
            token = (id(indices), sparse_linear_plan_key(x, values, indices, bias, self.weight_shape, allow_native))
        except RuntimeError:
            if not self._as_ordinary_tensors():
                raise
            return self.forward(x)
        return self._last_plan(token, lambda: sparse_linear_plan(
            x, values, indices, bias, self.weight_shape, allow_native), (values, indices, bias))(x)

    def extra_repr(self) -> str:
        total = math.prod(self.weight_shape)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}/{total} ({100.0 * self.nnz / total:.1f}%), bias={self.bias is not None}"
        )
