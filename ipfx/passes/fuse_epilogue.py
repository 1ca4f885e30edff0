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
as long as nothing in between writes into the memory of ``x`` or ``r`` (:func:`_written_between`: an
in-place op on either, on a view of either or on what either is a view of). The op's ``+`` is torch's,
broadcasting and promoting as an out-of-place add does; its kernel fuses the add only where ``r`` has the
output's shape and dtype. An in-place add ``y.add_(r)`` keeps ``y``'s shape and dtype (a wider ``r`` is
rounded to ``y``'s dtype, a larger one raises), so it is the op's add only where ``r`` is known to have
``y``'s shape and dtype (the graph's recorded values, as torch.export records them).

It returns early for a chain where this does not hold exactly: a convolution or intermediate result read
by anything else, an add that scales (``alpha``), an in-place add that writes into ``r`` rather than ``y`` or
whose ``r`` is not known to match ``y``, a write between the two places into memory ``x`` or ``r`` may
share, an activation with other arguments than the table allows.
"""

from __future__ import annotations

import inspect
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
        sharing = _sharing(gm)
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
            if not chain or _written_between(node, chain, (node.args[0], residual), sharing):
                continue
            graph = gm.graph
            with graph.inserting_before(chain[-1]):
                new = graph.call_module(node.target, node.args, {"residual": residual} if residual is not None else {})
            new.meta = dict(chain[-1].meta)
            sharing[new] = sharing[chain[-1]]  # (the same value, in the same memory as what reads it may see)
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
    if other is y or (in_place and not _same_shape_and_dtype(other, add)):
        return None
    return other


def _same_shape_and_dtype(r: fx.Node, add: fx.Node) -> bool:
    """Whether ``r``'s recorded value has the shape and dtype of the in-place add's result (which are
    ``y``'s): then ``y.add_(r)`` is ``y + r`` exactly. Sizes are compared by their expressions (a symbolic
    size equal only at run time counts as different); False where either value was not recorded."""
    values = [n.meta.get("val", n.meta.get("tensor_meta")) for n in (r, add)]
    if any(getattr(v, "shape", None) is None or getattr(v, "dtype", None) is None for v in values):
        return False
    (rv, yv) = values
    return rv.dtype == yv.dtype and [str(d) for d in rv.shape] == [str(d) for d in yv.shape]


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


def _written_between(conv: fx.Node, chain: list, inputs, sharing: dict) -> bool:
    """Whether a node between ``conv`` and the chain's last node, other than the chain's own (which write
    only into the chain's values), may write into memory one of ``inputs`` may share (:func:`_sharing`; what
    a node may write: :func:`_written`)."""
    watched = {sharing[n] for n in inputs if isinstance(n, fx.Node) and n in sharing}
    node = conv.next
    while node is not chain[-1]:
        if node not in chain and any(sharing.get(w) in watched for w in _written(node)):
            return True
        node = node.next
    return False


def _sharing(gm: fx.GraphModule) -> dict:
    """node -> a representative of the nodes whose values may share its memory: a node that may return (a view
    of) one of its arguments shares with them (:func:`_fresh` says which surely do not), and the graph's
    inputs and attributes may share with one another (a caller may pass views of one tensor, or a parameter).
    Over-approximates: two nodes apart surely do not share."""
    parent: dict = {}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a, b):
        parent[find(a)] = find(b)

    outside = None
    for node in gm.graph.nodes:
        parent[node] = node
        if node.op in ("placeholder", "get_attr"):
            outside = node if outside is None else outside
            union(node, outside)
        elif node.op != "output" and not _fresh(gm, node):
            for arg in _maybe_returned(node):
                union(node, arg)
    return {n: find(n) for n in parent}


def _maybe_returned(node: fx.Node) -> list:
    """The arguments whose memory ``node``'s value may be (a view of): those an aten operator's schema
    aliases to a result (``add_``'s ``self``, ``view``'s ``self``), an in-place method's tensor; every
    argument of anything else."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is not None:
        returned = {a for r in schema.returns if r.alias_info is not None for a in r.alias_info.before_set}
        aliased = []
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and returned & set(a.alias_info.before_set):
                aliased += _nodes_in(node.args[i] if i < len(node.args) else node.kwargs.get(a.name))
        return aliased if returned and aliased else list(node.all_input_nodes)
    if node.op == "call_method" and str(node.target).endswith("_") and node.args and \
            isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return list(node.all_input_nodes)


#: Python-level functions and tensor methods that return a new tensor, never an argument or a view of one
#: (without ``out=``).
FRESH_CALLS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg,
               torch.add, torch.sub, torch.mul, torch.cat, torch.stack, torch.relu, F.relu, F.conv2d, F.linear)
FRESH_METHODS = ("add", "sub", "mul", "div", "matmul", "relu", "sigmoid", "tanh")


def _fresh(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` surely returns new memory: an aten operator whose schema's results alias nothing, a
    fused op's module, one of :data:`FRESH_CALLS` / :data:`FRESH_METHODS` without ``out=``."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), SparseIPConv)
    if "out" in node.kwargs or _inplace_argument(node):
        return False
    if node.op == "call_method":
        return node.target in FRESH_METHODS
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
    return any(node.target is f for f in FRESH_CALLS)


def _written(node: fx.Node) -> list:
    """The nodes whose memory ``node`` may write: an aten operator's arguments its schema marks written; the
    first argument of an in-place method or function (a name ending in ``_``, ``operator.i*``,
    ``inplace=True``) and ``out=``; an ``inplace=True`` torch.nn module's input; nothing for ipfx's modules.
    A module or function from outside torch (a leaf the trace did not enter) may write any of its arguments."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return []
    args = list(node.all_input_nodes)
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    out = _nodes_in(node.kwargs.get("out"))
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if type(module).__module__.startswith("ipfx."):  # ipfx's modules write only their outputs
            return []
        if type(module).__module__.startswith("torch.nn."):
            return [first] if first is not None and getattr(module, "inplace", False) is True else []
        return args
    if node.op == "call_method":
        return ([first] if first is not None and str(node.target).endswith("_") else []) + out
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        written = []
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                written += _nodes_in(node.args[i] if i < len(node.args) else node.kwargs.get(a.name))
        return written
    name = getattr(node.target, "__name__", "")
    module = getattr(node.target, "__module__", None) or ""
    if not (module in ("_operator", "operator", "builtins", "math") or module.split(".")[0] == "torch"):
        return args
    in_place = name.endswith("_") or node.target is operator.setitem or _inplace_argument(node) or (
        module == "_operator" and name.startswith("i"))
    return ([first] if first is not None and in_place else []) + out


def _inplace_argument(node: fx.Node) -> bool:
    """Whether a call passes ``inplace=True``, by keyword or in the function's ``inplace`` position
    (``F.relu(x, True)``)."""
    if node.kwargs.get("inplace", False) is True:
        return True
    try:
        parameters = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: no inplace parameter
        return False
    return "inplace" in parameters and len(node.args) > parameters.index("inplace") and \
        node.args[parameters.index("inplace")] is True


def _nodes_in(value) -> list:
    """The nodes in an argument: a node, or a list or tuple of values."""
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, fx.Node)]
    return []
