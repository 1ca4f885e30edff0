"""Pass helpers: put standard modules back where the transform traced through them.

Where :class:`~ipfx.capture.tracing.WeightTracer` traced *through* an ``nn.ConvNd``/``nn.Linear``, its forward
became ``[pad(x) ->] conv(x, weight, bias, <the module's own geometry>)``. Replacing such a call by
``call_module(path, x)`` of a module of the original type holding the same weight and bias computes
the same thing (it is that module's forward), and gives back the graph a plain torch.fx trace of the
original model has. Calls that do not match the module's geometry or bias are left functional, which
is still correct.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from ..form.reparam import ModuleSpec
from .kernels import kernel_call


def restore_module_calls(gm: fx.GraphModule, path: str, spec: ModuleSpec, weight: fx.Node) -> None:
    """Every ``[pad(x) ->] conv(x, weight, <path>.bias, <spec's geometry>)`` -> ``call_module(path, x)``."""
    for call in list(weight.users):
        _restore_call(gm.graph, call, weight, path, spec)


def _restore_call(graph: fx.Graph, call: fx.Node, weight: fx.Node, prefix: str, spec: ModuleSpec) -> None:
    """``[pad(x) ->] conv(x, weight, bias, geometry)`` -> ``call_module(prefix, x)`` when it matches."""
    normalised = kernel_call(call)
    if normalised is None or normalised.weight is not weight:
        return
    kind, args = normalised.kind, normalised.arguments
    bias = args["bias"]
    has_bias = spec.get("bias")
    if has_bias and not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{prefix}.bias"):
        return
    if not has_bias and bias is not None:
        return
    if kind != "linear" and _geometry(args, kind) != _expected_geometry(spec, kind):
        return
    x = args["input"]
    pad = None
    if kind == "conv" and spec.get("padding_mode") != "zeros":
        if not (isinstance(x, fx.Node) and x.target is F.pad and len(x.users) == 1):
            return
        pad, x = x, x.args[0]
    with graph.inserting_before(call):
        new = graph.call_module(prefix, (x,))
    new.meta = dict(call.meta)
    call.replace_all_uses_with(new)
    graph.erase_node(call)
    if pad is not None:
        graph.erase_node(pad)
    if isinstance(bias, fx.Node) and not bias.users:
        graph.erase_node(bias)


def _geometry(args: dict, kind: str) -> list:
    names = ["stride", "padding", "dilation", "groups"]
    return [args[n] for n in (names if kind == "conv" else names + ["output_padding"])]


def _expected_geometry(spec, kind: str) -> list:
    if kind == "conv":
        padding = spec.get("padding")
        if spec.get("padding_mode") != "zeros":
            padding = tuple(0 for _ in spec.get("kernel_size"))
        return [spec.get("stride"), padding, spec.get("dilation"), spec.get("groups")]
    return [spec.get("stride"), spec.get("padding"), spec.get("dilation"), spec.get("groups"),
            spec.get("output_padding")]
