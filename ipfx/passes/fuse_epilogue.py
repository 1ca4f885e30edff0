"""Pass: move a residual add and an activation after a fused convolution into the op's epilogue.

``ipfx::ip_conv`` returns ``act(conv(x, W) + bias + residual)`` (:mod:`ipfx.ops.epilogue`), applied by the
native kernel while the output tile is in registers, so the graph's separate passes over memory go.
The pass rewrites, for a fused convolution ``y = conv(x)`` (a :class:`~ipfx.ops.SparseIPConv` call)::

    y -> add(y, r) -> act          ==>   conv(x, residual=r) with activation act
    y -> add(y, r)                 ==>   conv(x, residual=r)
    y -> act                       ==>   conv(x) with activation act

``act`` one of the activations in :data:`ACTIVATION_CALLS` (relu, relu6, silu, gelu, hardswish as they
appear in captured graphs). The new call takes the place of the chain's last node, so ``r`` may be computed
after the convolution (a ResNet's downsample branch); that moves the convolution later, which is exact
as long as nothing in between writes into ``x`` or ``r``. The op's ``+`` is torch's, broadcasting and
promoting as the add did; its kernel fuses the add only where ``r`` has the output's shape and dtype.

It returns early for a chain where this does not hold exactly: a convolution or intermediate result read
by anything else, an add that scales (``alpha``), an in-place add that writes into ``r`` rather than ``y``, an in-place op between the two
places on ``x`` or ``r``, an activation with other arguments than the table allows.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import SparseIPConv
from .manager import GraphPass, GraphSite, PassResult

aten = torch.ops.aten

#: call_function targets that are an activation the epilogue knows, with the extra arguments they may
#: carry (positional after the input, and keyword) for that activation to be meant exactly.
ACTIVATION_CALLS = {
    aten.relu.default: ("relu", ()), aten.relu_.default: ("relu", ()), F.relu: ("relu", ((False,), {"inplace"})),
    torch.relu: ("relu", ()),
    aten.hardtanh.default: ("relu6", ((0.0, 6.0),)), aten.hardtanh_.default: ("relu6", ((0.0, 6.0),)),
    F.relu6: ("relu6", ((False,), {"inplace"})),
    aten.silu.default: ("silu", ()), aten.silu_.default: ("silu", ()), F.silu: ("silu", ((False,), {"inplace"})),
    aten.gelu.default: ("gelu", (("none",), {"approximate"})), F.gelu: ("gelu", (("none",), {"approximate"})),
    aten.hardswish.default: ("hardswish", ()), aten.hardswish_.default: ("hardswish", ()),
    F.hardswish: ("hardswish", ((False,), {"inplace"})),
}
#: activation modules (call_module), with the attributes that must hold for the activation to be meant
ACTIVATION_MODULES = {
    nn.ReLU: ("relu", {}), nn.ReLU6: ("relu6", {}), nn.SiLU: ("silu", {}),
    nn.GELU: ("gelu", {"approximate": "none"}), nn.Hardswish: ("hardswish", {}),
}
ADD_CALLS = (operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor)
ADD_METHODS = ("add", "add_")


class FuseEpilogue(GraphPass):
    """Fold ``add`` and activations after fused convolutions into the op (module docstring). Changed: the
    convolutions' module paths."""

    name = "fuse epilogue"

    def run_graph(self, site: GraphSite) -> PassResult:
        result = PassResult()
        gm = site.gm
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node.kwargs or len(node.args) != 1 or calls[node.target] != 1:
                continue
            conv = gm.get_submodule(node.target)
            if not isinstance(conv, SparseIPConv) or conv.__dict__.get("activation", "none") != "none":
                continue
            chain, residual, activation = _chain(gm, node)
            if not chain or _written_between(node, chain[-1], (node.args[0], residual), order):
                continue
            graph = gm.graph
            with graph.inserting_before(chain[-1]):
                new = graph.call_module(node.target, node.args, {"residual": residual} if residual is not None else {})
            new.meta = dict(chain[-1].meta)
            chain[-1].replace_all_uses_with(new)
            for dead in reversed([node, *chain]):
                graph.erase_node(dead)
            conv.activation = activation
            result.changed.append(site.name_prefix + node.target)
        return result


def _chain(gm: fx.GraphModule, conv: fx.Node):
    """``(nodes after conv to fold, residual node or None, activation name)``; no nodes where none folds."""
    chain: list[fx.Node] = []
    residual = None
    current = conv
    user = _only_user(current)
    if user is not None:
        other = _residual_of(user, current)
        if other is not None:
            chain.append(user)
            residual = other
            current = user
            user = _only_user(current)
    activation = "none"
    if user is not None:
        found = _activation_of(gm, user, current)
        if found is not None:
            chain.append(user)
            activation = found
    return chain, residual, activation


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _residual_of(add: fx.Node, y: fx.Node) -> fx.Node | None:
    """The other operand ``r`` when ``add`` is ``y + r`` exactly (no alpha, no broadcast, no write into r)."""
    if add.op == "call_function" and add.target in ADD_CALLS:
        args = add.args
    elif add.op == "call_method" and add.target in ADD_METHODS:
        args = add.args
    else:
        return None
    if len(args) != 2 or any(k != "alpha" or v != 1 for k, v in add.kwargs.items()):
        return None
    a, b = args
    in_place = add.target in (operator.iadd, aten.add_.Tensor) or add.target == "add_"
    if a is y and isinstance(b, fx.Node):
        other = b
    elif b is y and isinstance(a, fx.Node) and not in_place:  # y + r's in-place form writes into r
        other = a
    else:
        return None
    if other is y:
        return None
    return other


def _activation_of(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> str | None:
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        entry = ACTIVATION_MODULES.get(type(module))
        if entry is None or len(node.args) != 1 or node.kwargs:
            return None
        name, attributes = entry
        return name if all(getattr(module, k, None) == v for k, v in attributes.items()) else None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
        return "relu"
    if node.op != "call_function" or node.target not in ACTIVATION_CALLS:
        return None
    name, allowed = ACTIVATION_CALLS[node.target]
    extra = node.args[1:]
    positional = allowed[0] if allowed else ()
    keywords = allowed[1] if len(allowed) > 1 else set()
    if len(extra) > len(positional) or any(v != p for v, p in zip(extra, positional)):
        return None
    if any(k not in keywords for k in node.kwargs):
        return None
    if name == "gelu" and node.kwargs.get("approximate", "none") != "none":
        return None
    if name == "relu6" and len(extra) != len(positional) and node.target in (aten.hardtanh.default,
                                                                             aten.hardtanh_.default):
        return None  # hardtanh without (0, 6) is another clamp
    return name


def _written_between(first: fx.Node, last: fx.Node, inputs, order: dict) -> bool:
    """Whether a node strictly between ``first`` and ``last`` may write into one of ``inputs`` (an in-place op:
    a name ending in ``_``, an ``inplace=True`` module or keyword, ``operator.i*``)."""
    watched = {n for n in inputs if isinstance(n, fx.Node)}
    node = first.next
    while node is not last:
        if _mutates(node) and any(a in watched for a in node.args[:1]):
            return True
        node = node.next
    return False


def _mutates(node: fx.Node) -> bool:
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return schema.is_mutable
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") or name.startswith("i") and node.target.__module__ == "_operator" or \
            node.kwargs.get("inplace", False) is True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_module":
        return bool(getattr(node.graph.owning_module.get_submodule(node.target), "inplace", False))
    return False
