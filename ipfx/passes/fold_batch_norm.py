"""Pass: fold an eval-mode batch norm into the fused convolution before it (``ipfx.lower(..., freeze=True)``).

In eval mode batch norm is a per-channel affine map with constants: with running mean ``mu``, variance
``var``, ``eps``, weight ``gamma`` (1 when absent) and bias ``beta`` (0 when absent)::

    bn(z)[o] = s[o] * (z[o] - mu[o]) + beta[o],     s = gamma / sqrt(var + eps)

and ``z = conv(x, W) + b`` is linear in ``W`` row by row (output channel ``o`` reads only ``W[o]``), so
``bn(conv(x, W) + b) = conv(x, s * W) + s * (b - mu) + beta``. In coefficient form ``W[o] =
reshape(C[o] @ B)``: scaling ``W[o]`` by ``s[o]`` is scaling the kept coefficients of row ``o`` (the basis
is shared by all rows and stays), so the fused op keeps its sparsity pattern and only its values and
bias change.

The pass rewrites ``call_module(fused conv) -> batch norm (eval)`` into the conv alone, with the scaled
values and the new bias. It returns early where this does not hold exactly: a transposed convolution
(its output channels are not the coefficients' rows), a convolution whose output feeds anything but the
batch norm, a module called more than once, a batch norm in training mode or with statistics computed
at run time.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from ..ops import SparseIPConv
from .manager import GraphPass, GraphSite, PassResult
from .subgraphs import constant_tensor

_BATCH_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FoldBatchNorm(GraphPass):
    """Fold eval-mode batch norms into the fused convolutions that feed them (module docstring). Changed:
    the convolutions' module paths; skipped: fused convolutions followed by a batch norm that could not be
    folded, with the reason."""

    name = "fold batch norm"

    def run_graph(self, site: GraphSite) -> PassResult:
        result = PassResult()
        gm = site.gm
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), SparseIPConv):
                continue
            if len(node.users) != 1:
                continue
            (user,) = node.users
            stats = batch_norm_constants(gm, user, node)
            if stats is None:
                continue
            name = site.name_prefix + node.target
            reason = _fold(gm.get_submodule(node.target), stats, calls[node.target])
            if reason is not None:
                result.skipped[name] = reason
                continue
            user.replace_all_uses_with(node)
            constants = [arg for arg in user.all_input_nodes if arg.op == "get_attr"]
            for dead in reversed(_bn_nodes(user)):
                gm.graph.erase_node(dead)
            for arg in constants:  # the statistics' reads, read by nothing now (each a getattr chain per call)
                if not arg.users:
                    gm.graph.erase_node(arg)
            result.changed.append(name)
        return result


def batch_norm_constants(gm: fx.GraphModule, node: fx.Node, source: fx.Node):
    """``(mean, var, weight, bias, eps)`` when ``node`` is an eval-mode batch norm of ``source`` whose
    statistics are constants of ``gm``; ``"training"`` or ``"computed"`` (reasons) when it is a batch norm
    that cannot be folded; None when it is no batch norm."""
    target = node.target
    if node.op == "call_module":
        module = gm.get_submodule(target)
        if not _plain_batch_norm(module) or node.args[:1] != (source,) or len(node.args) != 1 or node.kwargs:
            return None
        if module.running_mean is None or module.running_var is None:
            return "training"  # track_running_stats=False: batch statistics in every mode
        return module.running_mean, module.running_var, module.weight, module.bias, module.eps
    if node.op != "call_function" or not node.args or node.args[0] is not source:
        return None
    args = _normalised(node)
    if args is None:
        return None
    mean, var, weight, bias, training, eps = args
    if training is not False:
        return "training"
    values = [constant_tensor(gm, v) for v in (mean, var, weight, bias)]
    if any(v is False for v in values) or values[0] is None or values[1] is None:
        return "computed"
    return (*values, float(eps))


def _plain_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes torch's batch norm and nothing else: one of torch's classes, or a subclass
    that keeps their forward. A subclass with its own forward does more (timm's ``BatchNormAct2d`` applies
    an activation and dropout after the norm; kept whole by the symbolic trace, it is one call here): its
    statistics alone do not describe it."""
    return isinstance(module, _BATCH_NORM_MODULES) and type(module).forward is nn.modules.batchnorm._BatchNorm.forward


def _normalised(node: fx.Node):
    """``(mean, var, weight, bias, training, eps)`` of the batch norm calls the captured graphs hold."""
    a, kw = node.args, node.kwargs
    aten = torch.ops.aten
    if node.target is aten.batch_norm.default:
        # (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
        return a[3], a[4], a[1], a[2], a[5], a[7]
    if node.target is aten._native_batch_norm_legit_no_training.default:
        # (input, weight, bias, running_mean, running_var, momentum, eps) -> (out, mean, rstd)
        return a[3], a[4], a[1], a[2], False, a[6]
    if node.target is torch.nn.functional.batch_norm:
        # (input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        bound = {**defaults, **dict(zip(names, a)), **kw}
        return (bound["running_mean"], bound["running_var"], bound["weight"], bound["bias"], bound["training"],
                bound["eps"])
    return None


def _bn_nodes(node: fx.Node) -> list[fx.Node]:
    """The batch norm node and, for the op that returns a tuple, the ``getitem`` reading its output."""
    if node.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        return [node, *node.users]
    return [node]


@torch.no_grad()
def _fold(conv: SparseIPConv, stats, calls: int) -> str | None:
    if isinstance(stats, str):
        return {"training": "the batch norm uses batch statistics",
                "computed": "the batch norm's statistics are computed at run time"}[stats]
    if calls > 1:
        return "the convolution is called more than once"
    if conv.transposed:
        return "a transposed convolution's output channels are not its coefficients' rows"
    if conv.__dict__.get("activation", "none") != "none":
        return "the convolution already ends in an activation"
    mean, var, weight, bias, eps = stats
    if tuple(mean.shape) != (conv.weight_shape[0],):
        return f"the batch norm has {tuple(mean.shape)} statistics for {conv.weight_shape[0]} channels"
    scale = torch.rsqrt(var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    row = math.prod(conv.weight_shape[1:])  # coefficients per output channel: C[o] = C.view(-1)[o*row:(o+1)*row]
    rows = torch.div(conv.indices.long(), row, rounding_mode="floor")
    conv.values = (conv.values.double() * scale[rows]).to(conv.values.dtype)
    dtype = conv.bias.dtype if conv.bias is not None else conv.values.dtype
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=False)
    return None

