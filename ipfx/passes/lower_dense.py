"""Pass: fold every compose subgraph into a constant dense weight and restore ordinary modules.

Folding relies on nothing but evaluation: the subgraph ``reshape((mask * coeff) @ basis)`` has no
graph inputs, so its value ``W`` is a constant of the trained model and ``get_attr(P)`` holding ``W``
computes the same thing. ``P`` gets its original name (``<prefix>.weight``, or the original name of a
parameter called otherwise), so the lowered state_dict reads like the original model's.

Restoring modules: where the transform traced *through* a standard ``nn.ConvNd``/``nn.Linear``, its
inlined call ``[pad(x) ->] conv(x, P, bias, <the module's own geometry>)`` is replaced by
``call_module`` of a rebuilt module of the original type holding ``P`` and the bias. The graph is then
what a plain ``torch.fx`` trace of the original model gives. A call that does not match the module's
own geometry (the weight was used elsewhere by hand) stays functional, which is still correct.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..reparam import STATE_NAMES, BasisWeight, adopt_attributes
from .find_weights import is_kernel_call, kernel_call_arguments, kernel_call_info, weight_argument
from .subgraphs import ComposeSubgraph, compose_subgraphs, erase_nodes


class LowerDense(PassBase):
    """Fold the compose subgraphs selected by ``only`` (all when ``None``) into dense weights."""

    def __init__(self, only: set[str] | None = None) -> None:
        self.only = only
        self.lowered: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        for sub in compose_subgraphs(gm):
            if self.only is None or sub.prefix in self.only:
                fold_subgraph(gm, sub)
                self.lowered.append(sub.prefix)
        if self.lowered:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(self.lowered))


def fold_subgraph(gm: fx.GraphModule, sub: ComposeSubgraph) -> None:
    """Replace one compose subgraph by ``get_attr`` of the folded weight (module docstring)."""
    module = sub.module
    with torch.no_grad():
        weight = nn.Parameter(module.compose().detach().clone(), requires_grad=module.coeff.requires_grad)
    param_name = module.weight_name
    graph = gm.graph
    _replace_module(gm, sub.prefix, param_name, module, weight)
    if sub.output is not None:
        with graph.inserting_before(sub.nodes[0]):
            folded = graph.get_attr(param_name)
        sub.output.replace_all_uses_with(folded)
    erase_nodes(graph, sub.nodes)
    if sub.output is not None and module.source is not None:
        for user in list(folded.users):
            _restore_module_call(graph, user, folded, sub.prefix, module)
        if not folded.users:
            graph.erase_node(folded)


def _replace_module(gm, prefix: str, param_name: str, module: BasisWeight, weight: nn.Parameter) -> None:
    parent_path, _, leaf = prefix.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if param_name == f"{prefix}.weight":
        if module.source is not None:
            new = module.source.build(weight, module._parameters.get("bias"))
        else:
            new = nn.Module()
            new.weight = weight
        adopt_attributes(new, module, skip=STATE_NAMES)
        new.train(module.training)
        setattr(parent, leaf, new)
    else:  # the parameter had its own name: put it back on the parent
        delattr(parent, leaf)
        parent.register_parameter(leaf, weight)


def _restore_module_call(graph: fx.Graph, call: fx.Node, weight: fx.Node, prefix: str, module: BasisWeight) -> None:
    """``[pad(x) ->] conv(x, weight, bias, geometry)`` -> ``call_module(prefix, x)`` when it matches."""
    if not is_kernel_call(call) or weight_argument(call) is not weight:
        return
    kind, _ = kernel_call_info(call)
    spec = module.source
    args = kernel_call_arguments(call)
    if args is None:
        return
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
