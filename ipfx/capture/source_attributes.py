"""Captured graphs answer for the module they replaced: its attributes, properties and methods.

Partial tracing replaces a submodule by its captured graph (a ``GraphModule`` or a ``ModeSwitch``), and
code outside the graph may still read what the module offered: a plain attribute (``out_channels``),
a property (segmentation-models-pytorch's ``encoder.output_stride``), a helper method or a ``config``.
:func:`keep_source` copies the module's plain instance attributes onto the graph and records its class;
:class:`SourceAttributes` then resolves any other name the graph lacks on that class, with the graph as
``self``, so properties and methods run against the copied attributes and the graph's submodules.
Both survive ``copy.deepcopy`` (torch.fx's user-preserved attributes for a ``GraphModule``).
"""

from __future__ import annotations

import copy
import inspect
import operator
import threading
import warnings

import torch.fx as fx
import torch.nn as nn

from . import first_call, guards
from ..errors import IPFXValueError, user_stacklevel

_SOURCE = "_ipfx_source_class"
FROZEN = "ipfx_frozen"  # GraphModule.meta key: the graph computes the eval-mode function only (CapturedGraphModule.train)
FIXED_ATTRIBUTES = "ipfx_fixed_attributes"  # GraphModule.meta key: the captured module's plain attributes (record_fixed)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, hooks, training, ...
_PLAIN = (int, float, str, bool, tuple, list, dict, type(None))


class SourceAttributes:
    """Mixin: names this module lacks are looked up on the class of the module it replaced."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get(_SOURCE)
            if source is None or name.startswith("__") or hasattr(nn.Module, name) or name == "forward":
                raise
            try:
                attr = inspect.getattr_static(source, name)
            except AttributeError:
                raise AttributeError(f"'{type(self).__name__}' (captured {source.__name__}) has no attribute "
                                     f"{name!r}") from None
            if hasattr(attr, "__get__"):  # property, function, classmethod, staticmethod
                return attr.__get__(self, source)
            return attr


class CapturedGraphModule(SourceAttributes, fx.GraphModule):
    """The ``GraphModule`` every ipfx front end returns; calls are checked against the call pattern
    symbolic tracing specialised (:mod:`ipfx.capture.guards`), where there is one."""

    def __setattr__(self, name: str, value) -> None:
        meta = self.__dict__.get("meta")
        if meta is not None and FIXED_ATTRIBUTES in meta:
            warn_if_fixed(self, meta[FIXED_ATTRIBUTES], name, value)
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, but a frozen graph (:data:`FROZEN`: ``ipfx.lower(..., freeze=True)``) refuses train
        mode before anything changes: it computes the eval-mode function only (batch norms folded into its
        convolutions, dropout gone), so a train-mode call would silently compute eval mode."""
        if mode and self.__dict__.get("meta", {}).get(FROZEN):
            raise IPFXValueError(
                f"this {type(self).__name__} was lowered with freeze=True: it computes the model's eval-mode "
                "function only (batch norms folded into its convolutions, no dropout), so it cannot run in train "
                "mode; to train or calibrate, lower without freeze (ipfx.lower(model, 'fused')) or train the "
                "transformed model")
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        guards.follow_forms([self])
        return result

    def recompile(self):
        result = super().recompile()
        guards.sign(self)  # the new forward reports the captured signature again
        return result

    def __call__(self, *args, **kwargs):
        if guards.PATTERN in self.meta or guards.FALLBACK in self.meta:
            return guards.guarded_call(self, super().__call__, args, kwargs)
        return super().__call__(*args, **kwargs)

    def __deepcopy__(self, memo):
        """torch.fx rebuilds a copied GraphModule from its distinct children, dropping a child held under
        a second name (:func:`keep_aliases`): put every name back, on the same copied object. (Unpickling
        drops such a second name of a direct child too; it must stay torch's own, to load without ipfx.)"""
        result = super().__deepcopy__(memo)
        if type(result) is not type(self) and type(result).__name__ == "GraphModule":
            type(result).__name__ = type(self).__name__  # (torch.fx names a copy's own class GraphModule)
        for name, child in self._modules.items():
            if child is not None and name not in result._modules:
                result._modules[name] = copy.deepcopy(child, memo)
        guards.sign(result)  # meta (with the fallback) is copied after torch.fx's recompile
        return result

    def __reduce__(self):
        """A graph with a fallback (a module whose own forward runs for some calls, :mod:`ipfx.capture.guards`,
        :mod:`ipfx.capture.first_call`) unpickles as this class with its meta (:func:`_unpickled`): torch.fx
        rebuilds a plain ``GraphModule`` without meta, which ran the graph for every call, silently computing
        something else where the first-call check had found the graph wrong (a branch tracing could not see);
        so does a frozen graph (its ``train()`` refusal) and one with a call on buffers alone, rebuilt by
        :class:`BufferProxyTracer` (:func:`computes_on_buffers_alone`). Loading such a pickle needs ipfx; any other
        graph pickles as torch's own (it loads without ipfx)."""
        rebuild, args = super().__reduce__()
        if computes_on_buffers_alone(self):  # (computes_on_buffers_alone: rebuilt by a tracer that proxies buffers)
            args = ({**args[0], "_tracer_cls": BufferProxyTracer}, *args[1:])
        elif not any(key in self.meta for key in _BEHAVIOUR):
            return rebuild, args
        return _unpickled, (rebuild, args, self.meta)


#: Held by every trace ipfx makes (:class:`BufferProxyTracer`, ``ipfx.capture.tracing.WeightTracer``): torch.fx
#: patches ``nn.Module.__call__`` and ``__getattr__`` (and ipfx's capture ``__setattr__``) for the whole process
#: while it traces, so two traces at once (threads transforming models) ran into each other's patches: transforms
#: failed ("module is not installed as a submodule"), and the patches could be left in place for every later one.
TRACING = threading.RLock()


class BufferProxyTracer(fx.Tracer):
    """torch.fx's tracer, reading buffers as graph nodes (``get_attr``) as it reads parameters."""

    proxy_buffer_attributes = True

    def trace(self, root, concrete_args=None):
        with TRACING:
            return super().trace(root, concrete_args)


def computes_on_buffers_alone(gm: fx.GraphModule) -> bool:
    """Whether a call in ``gm`` takes no input but buffers and constants (torch.export's ``add_`` on a batch
    norm's ``num_batches_tracked``; a rotary embedding's ``inv_freq.float()``). torch.fx unpickles a graph by
    tracing its generated code with the module's real tensors, parameters as graph nodes but buffers as
    tensors, so such a call runs once at load, on the real buffer: an in-place update is applied then and
    dropped from the graph (the counter one ahead, then never counted again), a result is kept as a constant
    that no later ``load_state_dict`` or ``.to()`` reaches. Such graphs unpickle through
    :class:`BufferProxyTracer` (:meth:`CapturedGraphModule.__reduce__`; loading them needs ipfx)."""
    traced: set = set()  # nodes that are graph nodes while torch.fx traces the code
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_module"):
            traced.add(node)
        elif node.op == "get_attr":
            try:
                if isinstance(operator.attrgetter(node.target)(gm), nn.Parameter):
                    traced.add(node)
            except AttributeError:  # (a graph whose attribute is gone: no parameter)
                pass
        elif node.op in ("call_function", "call_method"):
            inputs = node.all_input_nodes
            if any(i in traced for i in inputs):
                traced.add(node)
            elif any(i.op == "get_attr" or i.op in ("call_function", "call_method") for i in inputs):
                return True
    return False


#: meta keys that change what a call of the graph runs: kept through pickling (CapturedGraphModule.__reduce__)
_BEHAVIOUR = (guards.FALLBACK, first_call.CHECK, first_call.USE_FORWARD, FROZEN)


def _unpickled(rebuild, args: tuple, meta: dict) -> fx.GraphModule:
    """torch.fx's rebuilt graph as a CapturedGraphModule with ``meta``: in a class of its own named as torch.fx
    names those (``GraphModule.__new__`` skips such classes when it copies one; one subclassing torch's class
    instead put two ``call_wrapped`` in a copy's classes, each calling the other), its forward and ``__call__``
    made by ``recompile`` as torch.fx makes them."""
    gm = rebuild(*args)
    gm.__class__ = type("GraphModuleImpl", (CapturedGraphModule,), {})
    gm.meta.update(meta)
    gm.recompile()
    return gm


def record_fixed(gm: fx.GraphModule, module: nn.Module) -> None:
    """Record on ``gm`` the public plain attributes (numbers, flags, strings, ...) of ``module``, which its graph
    captured: what the forward read of them is fixed in the graph (:func:`warn_if_fixed`)."""
    values = {k: v for k, v in vars(module).items()  # (not a name the graph module has itself: meta, graph, ...)
              if not k.startswith("_") and k not in _MODULE_INTERNALS and k not in vars(gm) and isinstance(v, _PLAIN)}
    if values:
        gm.meta[FIXED_ATTRIBUTES] = values


def warn_if_fixed(holder: nn.Module, fixed: dict, name: str, value) -> None:
    """Warn where ``name``, a plain attribute of the module ``holder``'s graph was captured from, is set to another
    value on ``holder``: the graph computes with the value it had at capture (torch.export and symbolic tracing
    both fix it), so the setting changes nothing the model computes."""
    if name not in fixed:
        return
    try:
        same = bool(fixed[name] == value) and type(fixed[name]) is type(value)
    except Exception:  # noqa: BLE001 - a value without a plain ==: another value
        same = False
    if not same:
        warnings.warn(f"{type(holder).__name__}.{name} = {value!r} changes nothing the transformed model computes: its "
                      f"graph fixed {name} = {fixed[name]!r} at capture. Set it on the original model and transform "
                      "that", stacklevel=user_stacklevel())


def plain_attributes(old: nn.Module, new: nn.Module) -> dict:
    """``old``'s plain instance attributes (``out_channels``, ``_depth``, ...) that ``new`` lacks."""
    return {key: value for key, value in vars(old).items()
            if key not in _MODULE_INTERNALS and key not in vars(new) and isinstance(value, _PLAIN)}


def keep_source(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` (the captured graph of ``old``) ``old``'s plain attributes and class (module docstring)."""
    if new is old:
        return
    _give(new, {**plain_attributes(old, new), _SOURCE: type(old)})


def hand_over_source(new: nn.Module, holder: nn.Module, own: tuple = ()) -> None:
    """Give ``new``, which takes ``holder``'s place (a ModeSwitch replaced by its eval-mode graph), what
    ``holder`` answers for: the plain attributes and class :func:`keep_source` gave it (not ``own``, the
    holder's own attributes)."""
    source = holder.__dict__.get(_SOURCE)
    if source is None or new is holder:
        return
    values = {k: v for k, v in plain_attributes(holder, new).items() if k not in own and k != _SOURCE}
    _give(new, {**values, _SOURCE: source})


def _give(new: nn.Module, values: dict) -> None:
    preserved = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    for key, value in values.items():
        new.__dict__[key] = value
        if preserved is not None and isinstance(new, fx.GraphModule):
            new.meta.setdefault(preserved, {})[key] = value


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``root``'s tree holds ``old`` (a module registered under two names is one
    object; it stays one)."""
    for holder in list(root.modules()):
        for name, child in list(holder._modules.items()):
            if child is old:
                holder._modules[name] = new


def set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, creating empty parent modules where the graph module has none."""
    parent = gm
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(parent, name):
            parent.add_module(name, nn.Module())
        parent = getattr(parent, name)
    setattr(parent, leaf, module)


def keep_containers(gm: fx.GraphModule, source: nn.Module) -> None:
    """Give the containers inside ``gm`` back their class and their entries.

    ``torch.fx`` rebuilds every module on the way to a node's target as a bare ``nn.Module`` holding only
    what the graph reads, so an ``nn.ModuleList`` of blocks becomes an object without ``len()``, indexing or
    iteration. Code outside the graph reads them all the same (diffusers: ``len(block.resnets)``). Each
    such module whose original in ``source`` is a ``ModuleList``, ``ModuleDict`` or ``Sequential`` (or a
    subclass) becomes an instance of that class again, with the original's entries in the original's
    order: those the graph holds as the graph holds them, the others as they were (never called by the
    graph; their weights are converted like any other weight no graph reads). Its plain attributes come
    along.
    """
    for path, bare in list(gm.named_modules()):
        if not path or type(bare) is not nn.Module:
            continue
        try:
            old = source.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(old, _CONTAINERS):
            continue
        new = type(old).__new__(type(old))
        new.__dict__.update(vars(bare))
        held = bare._modules
        new.__dict__["_modules"] = {**{name: held.get(name, child) for name, child in old._modules.items()},
                                    **{name: child for name, child in held.items() if name not in old._modules}}
        new.__dict__.update(plain_attributes(old, new))
        replace_module(gm, bare, new)  # under every path that holds it (keep_aliases): one object still


def keep_aliases(gm: fx.GraphModule, source: nn.Module, containers: bool = True) -> None:
    """Give ``gm`` every other path under which ``source`` holds a module ``gm`` holds.

    A module registered under two names (MONAI's DynUNet holds its blocks in lists and again in a chain
    of skip layers) appears in the state dict under both, but ``torch.fx`` keeps the path its trace met
    first. The other path is put back, pointing at the same object of ``gm`` (parents created bare on the
    way, containers with their class), so the state dict keeps every key of the model's, the lowered model
    loads into the model's class, and a rewrite under one path is seen under both. ``containers``: then
    :func:`keep_containers` (a traced part, whose containers code outside the graph may read).
    """
    groups: dict[int, list[str]] = {}
    for path, module in source.named_modules(remove_duplicate=False):
        if path:
            groups.setdefault(id(module), []).append(path)
    for path in [p for paths in groups.values() if len(paths) > 1 for p in paths]:
        anchor = next((p for p in groups[id(source.get_submodule(path))] if _resolves(gm, p)), None)
        if anchor is None or _resolves(gm, path):
            continue  # the graph holds it under no name (or under this one already)
        parent = gm
        *parents, leaf = path.split(".")
        for name in parents:
            if name not in parent._modules:
                parent.add_module(name, nn.Module())
            parent = parent._modules[name]
        parent._modules[leaf] = gm.get_submodule(anchor)
    if containers:
        keep_containers(gm, source)


def _resolves(gm: nn.Module, path: str) -> bool:
    module = gm
    for name in path.split("."):
        module = module._modules.get(name) if module is not None else None
    return module is not None
