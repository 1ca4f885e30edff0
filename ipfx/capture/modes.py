"""Modules whose forward depends on ``self.training``: one traced graph per mode, sharing every module.

torch.fx runs ``forward`` as Python, so everything a forward decides from ``self.training`` is fixed at
trace time: auxiliary classifiers (``if self.training: aux = self.aux1(x)``), ``F.dropout(x,
training=self.training)``, stochastic depth. A single trace would compute what the model computes in
one mode only, and weights used only in the other mode (auxiliary heads) would vanish from the graph.

:func:`ipfx.transform` therefore traces each module in both modes. Where the two graphs differ, the
result is a :class:`ModeSwitch`: the train-mode graph and the eval-mode graph, run according to the
switch's own ``training`` flag (``.train()``/``.eval()`` as usual). Modules whose inlined code reads the
flag follow the root's flag; ``call_module`` leaves (batch norm, dropout modules) keep their own.

Sharing: the switch and both ``GraphModule`` s hold *the same* ``_modules``/``_parameters``/``_buffers``
dicts, so every weight, coefficient and mask exists once, a module path means the same object in both
graphs, and the state dict (taken from the switch) has the original names. Copies that rebuild a
``GraphModule`` (``copy.deepcopy``, unpickling) give its graphs fresh containers around the same leaf
objects; the switch ties them back before it runs them.

Passes that must treat a weight once for both graphs (rewrite, fold, fuse) run on :meth:`ModeSwitch.combine`:
one graph holding both, whose nodes are tagged with their mode and whose output is ``(train, eval)``.
Since both halves read weights through the same ``get_attr`` paths, a pass that rewrites every use of a
weight rewrites it in both modes at once. :meth:`ModeSwitch.split` cuts the result back: each half is
every node of its mode plus everything those nodes read (shared weight subgraphs go to both).
"""

from __future__ import annotations

import inspect

import torch.fx as fx
import torch.nn as nn

from .guards import FALLBACK, signature_of
from .source_attributes import FIXED_ATTRIBUTES, SourceAttributes, hand_over_source, warn_if_fixed

_TREE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")
_MODE = "ipfx_mode"  # node.meta key: True (train graph) / False (eval graph)
_PLACEHOLDER = "ipfx_placeholder"  # node.meta key: (target, args) of a placeholder renamed in the combined graph


class _SignedForward:
    """``ModeSwitch.forward``, with the signature of its graphs' ``forward`` (the model's argument names and
    defaults) instead of ``(*args, **kwargs)``: ``inspect.signature`` and torch.export's ``dynamic_shapes``
    (matched to the forward's parameters: ``({0: batch},)`` for ``forward(x)``) see the model's arguments."""

    def __get__(self, switch, cls=None):
        if switch is None:
            return ModeSwitch._forward

        def forward(*args, **kwargs):
            return ModeSwitch._forward(switch, *args, **kwargs)

        gm = switch.graph_module(True)
        key = id(gm.meta.get(FALLBACK))  # the captured forward's signature, once there is a fallback
        cached = switch.__dict__.get("_ipfx_signature")
        if cached is None or cached[0] != key:
            cached = switch.__dict__["_ipfx_signature"] = (key, _graph_signature(gm))
        signature = cached[1]
        if signature is not False:
            forward.__signature__ = signature
        return forward


def _graph_signature(gm: fx.GraphModule):
    """The signature of the forward ``gm`` was captured from, else of ``gm.forward``, without ``self``; or
    False where it has none to read."""
    captured = signature_of(gm)
    if captured is not None:
        return captured
    try:
        return inspect.signature(gm.forward)
    except (TypeError, ValueError):
        return False


#: The plain attributes a ModeSwitch keeps for itself (not the replaced module's)
_OWN = ("_graphs", "_ipfx_signature")


class ModeSwitch(SourceAttributes, nn.Module):
    """A traced module with one graph per training mode, run by ``self.training`` (module docstring).

    ``ipfx.transform`` returns one (or holds one inside a partially traced model) when torch.fx gives
    different graphs for the model in train and in eval mode; ``ipfx.lower`` lowers both graphs.
    """

    def __init__(self, train: fx.GraphModule, eval: fx.GraphModule, training: bool = True) -> None:
        super().__init__()
        _rename_clashing_constants(eval, train)
        merge_tree(train, eval)
        for holder in (eval, self):
            share_tree(holder, train)
        self.__dict__["_graphs"] = {True: train, False: eval}  # plain attribute: not a child module
        self.training = training

    def __setattr__(self, name: str, value) -> None:
        graphs = self.__dict__.get("_graphs")
        fixed = graphs[True].__dict__.get("meta", {}).get(FIXED_ATTRIBUTES) if graphs is not None else None
        if fixed is not None:
            warn_if_fixed(self, fixed, name, value)
        super().__setattr__(name, value)

    def graph_module(self, training: bool) -> fx.GraphModule:
        """The ``GraphModule`` run in train (``True``) or eval (``False``) mode."""
        gm = self.__dict__["_graphs"][bool(training)]
        if gm.__dict__["_modules"] is not self._modules:
            share_tree(gm, self)  # a deep copy or unpickling rebuilt the graph module's containers
        return gm

    def _forward(self, *args, **kwargs):
        gm = self.graph_module(self.training)
        gm.training = self.training  # what a guard's fallback runs in (ipfx.capture.guards)
        return gm(*args, **kwargs)

    forward = _SignedForward()

    def extra_repr(self) -> str:
        return "one traced graph for train mode and one for eval mode, sharing these modules"

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        from .guards import follow_forms  # the graphs are not children: their fallbacks follow here

        follow_forms([self.graph_module(True), self.graph_module(False)])
        return result

    # -- passes over both graphs at once ------------------------------------------------------------
    def combine(self) -> fx.GraphModule:
        """One ``GraphModule`` (sharing this module's tree) whose graph holds both modes' graphs."""
        graph = fx.Graph()
        outputs = []
        constants: dict[tuple, fx.Node] = {}  # computations on weights alone, shared by the two modes
        shared: set[fx.Node] = set()  # their nodes
        updated = {target for mode in (True, False) for target in _updated_attributes(self.graph_module(mode).graph)}
        for mode in (True, False):
            env: dict[fx.Node, fx.Node] = {}
            for node in self.graph_module(mode).graph.nodes:
                if node.op == "output":
                    outputs.append(fx.map_arg(node.args[0], env.__getitem__))
                    continue
                key = None if node.op == "get_attr" and node.target in updated else _constant_key(node, env, shared)
                if key is not None and key in constants:
                    env[node] = constants[key]
                    continue
                new = graph.node_copy(node, env.__getitem__)
                if key is not None:
                    constants[key] = new
                    shared.add(new)
                new.meta[_MODE] = mode
                if node.op == "placeholder":  # unique names, no defaults: a valid combined signature
                    new.meta[_PLACEHOLDER] = (node.target, node.args)
                    new.target, new.args = new.name, ()
                env[node] = new
        graph.output(tuple(outputs))
        combined = fx.GraphModule(self, graph, class_name=type(self.graph_module(True)).__name__)
        share_tree(combined, self)
        return combined

    def split(self, combined: fx.GraphModule) -> None:
        """Take the two graphs back from ``combined`` (made by :meth:`combine`, then transformed)."""
        for index, mode in enumerate((True, False)):
            gm = self.graph_module(mode)
            gm.graph = _half(combined.graph, mode, index, gm.graph)


def keep_eval_graphs(model: nn.Module) -> nn.Module:
    """``model`` with every ModeSwitch in it (``model`` itself included) replaced by its eval-mode graph
    module, in eval mode: what computes the model's eval-mode function and nothing else (for a deployment
    that folds what eval mode makes constant). Returns the new root where ``model`` was a switch."""
    if isinstance(model, ModeSwitch):
        graph = model.graph_module(False)
        hand_over_source(graph, model, own=_OWN)  # (code outside may read what the switch answered for)
        return keep_eval_graphs(graph).eval()
    for name, child in list(model.named_children()):
        replaced = keep_eval_graphs(child)
        if replaced is not child:
            setattr(model, name, replaced)
    return model.eval()


def graphs_of(holder: fx.GraphModule | ModeSwitch) -> list[fx.GraphModule]:
    """The graph modules ``holder`` runs: a ModeSwitch's two, or the graph module itself."""
    if isinstance(holder, ModeSwitch):
        return [holder.graph_module(True), holder.graph_module(False)]
    return [holder]


def graphs_in(model: nn.Module):
    """``(path, graph module)`` for every graph ``model`` holds, a ModeSwitch's two included (path "" for the
    model itself)."""
    for path, m in model.named_modules():
        if isinstance(m, (ModeSwitch, fx.GraphModule)):
            for gm in graphs_of(m):
                yield path, gm


def _constant_key(node: fx.Node, env: dict, shared: set) -> tuple | None:
    """A key equal for equal computations from weights only (``get_attr`` and what is computed from them).

    Both modes then read one compose subgraph per weight, as the passes expect. Sharing such a node in
    the combined graph changes nothing either mode computes: :func:`_half` gives each mode its own copy.
    """
    if node.op == "get_attr":
        return ("get_attr", node.target)
    if node.op not in ("call_function", "call_method"):
        return None
    if not node.all_input_nodes or any(env[n] not in shared for n in node.all_input_nodes):
        return None
    try:
        key = (node.op, node.target, _freeze(fx.map_arg(node.args, env.__getitem__)),
               _freeze(fx.map_arg(node.kwargs, env.__getitem__)))
        hash(key)
    except TypeError:
        return None
    return key


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` changes its first argument in place (``copy_``, ``add_``, an aten op of a mutable schema)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _updated_attributes(graph: fx.Graph) -> set[str]:
    """The attributes (buffers) ``graph`` updates in place: never shared between the modes by :meth:`ModeSwitch.
    combine`, nor is anything computed from them. Shared, an update (``n.copy_(n + 1)``, from buffers alone, so
    keyed as a computation on weights) was kept by the train-mode half only, and eval-mode calls lost it."""
    updated = set()
    for node in graph.nodes:
        if _mutates(node) and node.args and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            while source.op != "get_attr" and source.op in ("call_function", "call_method") and source.args \
                    and isinstance(source.args[0], fx.Node) and _views(source):
                source = source.args[0]
            if source.op == "get_attr":
                updated.add(source.target)
    return updated


def _views(node: fx.Node) -> bool:
    """Whether ``node`` may return a view of its first argument (an update through it reaches the argument)."""
    name = str(node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target))
    return name.split(".")[0] in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "__getitem__", "getitem",
                                  "select", "slice", "narrow", "expand", "permute", "transpose", "t", "as_strided",
                                  "detach", "view_as", "alias", "unflatten")


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_freeze, value))
    if isinstance(value, dict):
        return ("dict", *((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _freeze(value.start), _freeze(value.stop), _freeze(value.step))
    return value


def _half(combined: fx.Graph, mode: bool, index: int, old: fx.Graph) -> fx.Graph:
    """Every node tagged ``mode`` and all it reads, in the combined graph's order."""
    output = next(n for n in reversed(combined.nodes) if n.op == "output")
    value = output.args[0][index]
    keep: set[fx.Node] = set()
    # (not a read of an attribute that nothing uses: an exported graph reads every buffer, and a dead read of an
    # updated one, which combine does not share, would keep its module in a frozen graph)
    stack = [n for n in combined.nodes if n.meta.get(_MODE) is mode and (n.op != "get_attr" or n.users)]
    fx.map_arg(value, stack.append)
    while stack:
        node = stack.pop()
        if node not in keep:
            keep.add(node)
            stack.extend(node.all_input_nodes)
    graph = fx.Graph()
    graph._codegen = old._codegen  # the traced signature and output structure (pytree codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in combined.nodes:
        if node not in keep or node.op == "output":
            continue
        if node.op == "placeholder":
            target, args = node.meta[_PLACEHOLDER]
            new = graph.create_node("placeholder", target, args, name=target.lstrip("*"), type_expr=node.type)
            new.meta = {k: v for k, v in node.meta.items() if k not in (_MODE, _PLACEHOLDER)}
        else:
            new = graph.node_copy(node, env.__getitem__)
            new.meta.pop(_MODE, None)
        env[node] = new
    old_output = next(n for n in reversed(old.nodes) if n.op == "output")
    graph.output(fx.map_arg(value, env.__getitem__), type_expr=old_output.type)
    graph.lint()
    return graph


def _rename_clashing_constants(gm: fx.GraphModule, other: fx.GraphModule) -> None:
    """Give ``gm``'s root tensors that share a name with a different tensor of ``other`` a fresh name.

    Each trace numbers the constants it creates (``_tensor_constant0``, ...) on its own, so the same name
    can stand for different tensors in the two modes' graphs. Everything below the root is the model's
    own and the same object in both.
    """
    renames = {}
    for store in ("_parameters", "_buffers"):
        for name, tensor in list(getattr(gm, store).items()):
            theirs = other._parameters.get(name, other._buffers.get(name))
            if theirs is None or theirs is tensor:
                continue
            new = f"{name}_eval"
            while hasattr(gm, new) or hasattr(other, new):
                new += "_"
            if store == "_buffers":
                gm.register_buffer(new, tensor, persistent=name not in gm._non_persistent_buffers_set)
            else:
                gm.register_parameter(new, tensor)
            delattr(gm, name)
            renames[name] = new
    if renames:
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target.split(".")[0] in renames:
                head, _, rest = node.target.partition(".")
                node.target = renames[head] + ("." + rest if rest else "")
        gm.recompile()


def share_tree(holder: nn.Module, source: nn.Module) -> None:
    """Make ``holder`` hold exactly ``source``'s children, parameters and buffers (the same dicts)."""
    for key in _TREE:
        holder.__dict__[key] = source.__dict__[key]


def merge_tree(into: nn.Module, other: nn.Module) -> None:
    """Add to ``into``'s module tree what only ``other``'s has, and make ``other`` use ``into``'s.

    Both trees come from traces of one model, so a path names the same leaf object in both; only the
    intermediate containers ``fx.GraphModule`` creates (plain ``nn.Module`` s) differ.
    """
    for name, tensor in other._parameters.items():
        into._parameters.setdefault(name, tensor)
    for name, tensor in other._buffers.items():
        if name not in into._buffers:
            into._buffers[name] = tensor
            if name in other._non_persistent_buffers_set:
                into._non_persistent_buffers_set.add(name)
    for name, child in other._modules.items():
        mine = into._modules.get(name)
        if mine is None:
            into._modules[name] = child
        elif mine is not child:
            if type(mine) is nn.Module and type(child) is not nn.Module:
                mine, child = child, mine  # keep the real module, not fx's stand-in container
            merge_tree(mine, child)
            into._modules[name] = mine
