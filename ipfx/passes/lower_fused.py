"""Pass: replace each coefficient-form convolution by a fused sparse IP convolution.

By linearity of convolution in its kernel, with ``W = reshape(C @ B, shape)`` and ``C = mask * coeff``::

    conv(x, W) = sum_j conv(x, F_j) * C[..., j]

so ``conv(x, W)`` can be computed from the basis filters ``F_j`` (rows of ``B``) and the *kept*
coefficients alone (``torch.ops.ipfx.ip_conv``, see :mod:`ipfx.ops.ip_conv`). The pass rewrites::

    compose subgraph -> W;  conv(x, W, bias, geometry)   ==>   call_module(prefix, x)

with a :class:`~ipfx.ops.SparseIPConv` (or :class:`~ipfx.ops.SparseLinear`) at ``prefix`` storing the
nonzeros of ``C``, the basis and the bias. It applies only where the composed weight feeds nothing
but conv/linear calls with constant geometry, all alike; elsewhere (weight standardisation, a weight
also used for something else) it returns early for that weight and records why, and the dense
lowering that runs next folds it instead. Outputs are unchanged up to float rounding.

``padding="same"`` is resolved to explicit numbers: total ``d (k - 1)`` per dim, ``total // 2`` before
and the rest after, as torch does; an asymmetric remainder becomes an explicit ``F.pad`` node.
"""

from __future__ import annotations


import torch
import torch.fx as fx
import torch.nn.functional as F

from ..capture.source_attributes import set_submodule
from ..form.compose import compose_weight
from ..form.reparam import STATE_NAMES, BasisWeight, adopt_attributes
from ..ops import SparseIPConv, SparseLinear
from .kernels import kernel_call
from .manager import GraphPass, GraphSite, PassResult
from .subgraphs import ComposeSubgraph, compose_subgraphs, constant_tensor, erase_nodes


class LowerFused(GraphPass):
    """Fuse every eligible compose subgraph + conv into a sparse IP conv (module docstring). Changed: the
    prefixes fused; skipped: those left for the dense lowering, with the reason."""

    name = "lower fused"

    def run_graph(self, site: GraphSite) -> PassResult:
        result = PassResult()
        for sub in compose_subgraphs(site.gm):
            reason = self._fuse(site.gm, sub)
            if reason is None:
                result.changed.append(sub.prefix)
            else:
                result.skipped[sub.prefix] = reason
        return result

    def _fuse(self, gm: fx.GraphModule, sub: ComposeSubgraph) -> str | None:
        if sub.output is None:
            return "weight unused"
        calls = [kernel_call(c) for c in sub.output.users]
        if not all(c is not None and c.weight is sub.output and not c.weight_transposed for c in calls):
            return "the weight is processed in forward before the convolution"
        geometry = [c.geometry for c in calls]
        if any(g != geometry[0] for g in geometry[1:]):
            return "the weight is used by convolutions of different geometry"
        geometry = geometry[0]
        if any(isinstance(v, fx.Node) for k, v in geometry.items() if k != "bias"):
            return "geometry computed at run time"
        bias = constant_tensor(gm, geometry["bias"])
        if bias is False:
            return "bias computed at run time"
        module = sub.module
        passenger_bias = module._parameters.get("bias", module._buffers.get("bias"))
        if passenger_bias is not None and bias is not passenger_bias:
            return "the module holds a 'bias' that the convolution does not use"
        kind, dims = calls[0].kind, calls[0].dims
        fused, pad = _fused_module(module, kind, dims, geometry, bias)
        adopt_attributes(fused, module, skip=(*STATE_NAMES, "bias"))
        fused.training = module.training
        set_submodule(gm, sub.prefix, fused)
        graph = gm.graph
        for call in calls:
            with graph.inserting_before(call.node):
                x = call.input
                if pad is not None:
                    x = graph.call_function(F.pad, (x, pad))
                new = graph.call_module(sub.prefix, (x,))
            new.meta = dict(call.node.meta)  # (the same value: what later passes read of it, as fuse_epilogue)
            call.node.replace_all_uses_with(new)
            graph.erase_node(call.node)
        erase_nodes(graph, sub.nodes)
        bias_node = geometry["bias"]
        if isinstance(bias_node, fx.Node) and not bias_node.users:
            graph.erase_node(bias_node)
        return None


def _fused_module(module: BasisWeight, kind: str, dims: int, geometry: dict, bias):
    with torch.no_grad():
        masked = compose_weight(module.coeff, module.mask, None, None, False).detach()  # C = mask * coeff
        if kind == "linear":
            return SparseLinear.from_weight(masked, bias), None
        kernel = module.weight_shape[2:]
        padding, pad = _explicit_padding(geometry["padding"], kernel, _per_dim(geometry["dilation"], dims))
        basis = module.basis.detach() if module.multiplies_basis else None  # None: the identity
        fused = SparseIPConv.from_coefficients(
            masked, basis, bias, weight_shape=module.weight_shape, stride=_per_dim(geometry["stride"], dims),
            padding=padding, dilation=_per_dim(geometry["dilation"], dims), groups=int(geometry["groups"]),
            transposed=kind == "conv_transpose",
            output_padding=_per_dim(geometry.get("output_padding", 0), dims))
    return fused, pad


def _explicit_padding(padding, kernel, dilation):
    """Symmetric per-dim padding for the op, plus an ``F.pad`` list for any asymmetric remainder."""
    d = len(kernel)
    if padding == "valid":
        return (0,) * d, None
    if padding != "same":
        return _per_dim(padding, d), None
    total = [dl * (k - 1) for k, dl in zip(kernel, dilation)]
    before = [t // 2 for t in total]
    extra = [t - b - b for t, b in zip(total, before)]  # 0 or 1, always after
    if not any(extra):
        return tuple(before), None
    pad = []
    for e in reversed(extra):  # F.pad lists the last dim first
        pad += [0, e]
    return tuple(before), pad


def _per_dim(value, d: int) -> tuple:
    if isinstance(value, int):
        return (value,) * d
    value = tuple(int(v) for v in value)
    return value * d if len(value) == 1 else value

