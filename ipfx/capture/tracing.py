"""Symbolic tracing that exposes convolution and linear weights as graph nodes.

The default ``torch.fx`` tracer keeps ``nn.Conv2d`` & co. as opaque ``call_module`` leaves, so their
weight never appears in the graph. :class:`WeightTracer` traces *into* the standard conv and linear
modules whose weight the config wants rewritten: their ``forward`` becomes ``get_attr(weight)`` ->
``conv2d``/``linear`` (with the ``pad`` node of a non-zero ``padding_mode``), and the weight can be
rewritten like any other parameter. Batch norms of other libraries stay whole (their forward updates
buffers in Python); everything else keeps the default leaf rules, plus the leaves the user names. The
modules traced through are recorded, so lowering can put them back.

:func:`trace_modes` traces in train and in eval mode, because a forward that reads ``self.training``
gives a different graph in each (:mod:`ipfx.capture.modes`).
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import operator
import re
import warnings
from typing import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize as torch_parametrize

from .attention import attention_call, install_attention_kernels
from ..config import DEFAULT_MODULE_TYPES, TransformConfig
from ..errors import TraceError, first_line, user_stacklevel
from .first_call import rebind_buffer
from .verify import buffer_slots
from .guards import PATTERN, CallPattern
from .modes import ModeSwitch
from .snapshot import Snapshot
from .source_attributes import TRACING, CapturedGraphModule, keep_aliases, record_fixed

STANDARD_TYPES = frozenset(DEFAULT_MODULE_TYPES)


class WeightTracer(fx.Tracer):
    """``fx.Tracer`` that inlines standard conv/linear modules selected by a :class:`TransformConfig`."""

    def __init__(self, config: TransformConfig | None = None, leaf_modules: Iterable[str | type] = (),
                 name_prefix: str = "") -> None:
        super().__init__()
        self.config = config if config is not None else TransformConfig()
        self.name_prefix = name_prefix  # where the traced module sits in the user's model (config patterns)
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.inlined: dict[str, nn.Module] = {}
        self.attention: list[str] = []  # nn.MultiheadAttention modules recorded with their weights as inputs
        self.failed_module: tuple[str, type] | None = None
        # id -> (buffer, its version and value when first read): buffers_computed_at_trace
        self.buffers_read: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.assigned: dict[int, tuple[str, fx.Proxy]] = {}  # id(buffer) -> (path, value): _buffer_assignments_captured

    def trace(self, root, concrete_args=None):
        # the buffers as the trace begins (buffers_computed_at_trace, _put_back)
        self.originals = list(root.named_buffers(remove_duplicate=False)) if isinstance(root, nn.Module) else []
        # and every buffer slot, those registered as None included (a forward may set them: _put_back)
        self.slots = buffer_slots(root) if isinstance(root, nn.Module) else {}
        with TRACING:  # (one trace at a time in the process: source_attributes.TRACING)
            if not self.proxy_buffer_attributes:
                graph = super().trace(root, concrete_args)
            else:
                with _buffer_assignments_captured(self):
                    graph = super().trace(root, concrete_args)
        _refuse_set_slots(self)
        _write_assigned_buffers(graph, self.assigned.values())
        return graph

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """torch.fx's, recording each buffer the forward reads (:func:`buffers_computed_at_trace`); a buffer the
        forward assigned reads as the value assigned (:func:`_buffer_assignments_captured`)."""
        if isinstance(attr_val, torch.Tensor) and id(attr_val) in self.assigned:
            return self.assigned[id(attr_val)][1]
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter) and \
                id(attr_val) not in self.buffers_read and not isinstance(attr_val, fx.Proxy):
            self.buffers_read[id(attr_val)] = (attr_val, attr_val._version, attr_val.detach().clone())
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if isinstance(m, torch_parametrize.ParametrizationList) or ".parametrizations." in f".{module_qualified_name}":
            return False  # a weight's parametrizations (weight norm): traced into, so its originals are graph nodes
        if own_type(m) in STANDARD_TYPES and self._wanted(m, module_qualified_name):
            self.inlined[module_qualified_name] = m
            return False
        if self._stateful_norm(m, module_qualified_name):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def _stateful_norm(self, m: nn.Module, name: str) -> bool:
        """A batch norm of a class outside ``torch.nn`` (timm's ``BatchNormAct2d``, ...), kept whole.

        Its Python forward updates buffers in place (``num_batches_tracked.add_(1)``): traced into, that
        update would run once on the real buffer, at trace time, and be missing from the graph, and the
        buffer, which no graph node then reads, from the state dict. Kept as a leaf it runs as it is, as
        ``nn.BatchNorm2d`` does. Not when it holds a conv or linear weight to rewrite.
        """
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            return False
        return not any(type(sub) in STANDARD_TYPES and self._wanted(sub, f"{name}.{sub_name}" if name else sub_name)
                       for sub_name, sub in m.named_modules() if sub_name)

    def _wanted(self, m: nn.Module, name: str) -> bool:
        weight = _kernel_parameter(m)
        if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
            return False
        weight_name = self.name_prefix + (f"{name}.weight" if name else "weight")
        is_linear = isinstance(m, nn.Linear)
        kernel = () if is_linear else tuple(weight.shape[2:])
        return self.config.settings_for(weight_name, type(m), kernel, is_linear) is not None

    def _attention_wanted(self, m: nn.MultiheadAttention) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return False
        name = self.path_of_module(m)
        out = m.out_proj._parameters.get("weight")
        return name not in self.leaf_names and isinstance(out, nn.Parameter) and self.config.settings_for(
            f"{self.name_prefix}{name}.out_proj.weight", type(m.out_proj), (), True) is not None

    def create_arg(self, a):
        """A mapping of a dict subclass built from keywords (Hugging Face's ``ModelOutput`` dataclasses) is
        rebuilt in the graph as that class: torch.fx records it as a plain dict, and code outside the graph
        reads its fields as attributes (``outputs.last_hidden_state``)."""
        if isinstance(a, dict) and type(a) is not dict and _keyword_mapping(type(a)) and all(
                isinstance(k, str) and k.isidentifier() for k in a):
            fields = {k: super(WeightTracer, self).create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        if type(m) is nn.MultiheadAttention and self._attention_wanted(m):
            path = self.path_of_module(m)
            if path not in self.leaf_names and path not in self.attention:
                self.attention.append(path)
            return attention_call(self, path, m, args, kwargs)
        _check_call(m, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # innermost module that failed
                self.failed_module = (self.path_of_module(m), type(m))
            raise


@contextlib.contextmanager
def _buffer_assignments_captured(tracer: WeightTracer):
    """While ``tracer`` traces with buffers as graph nodes, a traced value assigned to a buffer (``self.n += 1``,
    ``self.n = self.n + 1``: torch.fx's proxies have no in-place operators, and a module refuses a proxy as a
    buffer, so the trace failed and the update was lost) is recorded in ``tracer.assigned``, and later reads of
    the buffer in the forward read that value (as eagerly, where the attribute is the new tensor); the buffer
    itself is written when the forward ends (:func:`_write_assigned_buffers`), so that what still holds its old
    value (``old = self.n; self.n = self.n + 1; self.prev = old``, a swap ``self.a, self.b = self.b, self.a``)
    keeps it, as eagerly."""
    original = nn.Module.__setattr__

    def assign(module, name, value):
        buffers = module.__dict__.get("_buffers")
        buffer = buffers.get(name) if buffers is not None and isinstance(value, fx.Proxy) else None
        path = next((p for p, b in tracer.originals if b is buffer), None) if buffer is not None else None
        if path is not None and value.tracer is tracer:
            tracer.assigned[id(buffer)] = (path, value)
            return
        original(module, name, value)

    nn.Module.__setattr__ = assign
    try:
        yield
    finally:
        nn.Module.__setattr__ = original


def _refuse_set_slots(tracer: WeightTracer) -> None:
    """Raise where the forward set a buffer registered as None, registered a new one (``register_buffer("run",
    None)``, then ``self.run = ...``; ``if not hasattr(self, "cache"): self.register_buffer(...)``) or cleared one
    (``self.cache = None``), after putting those slots back: a graph cannot follow (at every call it takes the
    path the buffer's state took while tracing, and holds no such buffer, so the state dict loses it); the module
    that holds it is then kept as Python code (:mod:`ipfx.capture.partial`), its children captured."""
    slots = buffer_slots(tracer.root)
    set_now = [path for path, b in slots.items() if (b is None) != (tracer.slots.get(path, ...) is None)] + \
        sorted(slots.keys() - tracer.slots.keys())
    if not set_now:
        return
    _restore_slots(tracer)
    path = set_now[0]
    owner = path.rpartition(".")[0]
    tracer.failed_module = (owner, type(tracer.root.get_submodule(owner)))
    how = ("clears buffer {!r} (sets it to None)" if slots.get(path, ...) is None else
           "sets buffer {!r}, registered as None" if path in tracer.slots else "registers buffer {!r}")
    raise SetsBuffers(f"the forward {how.format(path)}: a graph cannot capture that (it would take, at every call, "
                      "the path the buffer's state took while tracing)")


class SetsBuffers(RuntimeError):
    """A trace set, registered or cleared a buffer slot (:func:`_refuse_set_slots`): the module holding it is not
    traceable in either mode (:func:`trace_modes`), whichever mode's trace found it."""


def _restore_slots(tracer: WeightTracer) -> None:
    """The buffer slots as the trace began: one registered as None None again, one registered since gone, one
    cleared its tensor again."""
    for path in buffer_slots(tracer.root).keys() - tracer.slots.keys():
        owner, _, name = path.rpartition(".")
        del tracer.root.get_submodule(owner)._buffers[name]
    for path, buffer in tracer.slots.items():
        rebind_buffer(tracer.root, path, buffer)


def _write_assigned_buffers(graph: fx.Graph, assigned) -> None:
    """Before ``graph``'s output, each buffer the forward assigned (``assigned``: (path, value)) takes
    its last value in place: every value copied first (a value may be another assigned buffer, or a view of one),
    then each buffer written, ``buffer.copy_(value)``, after checks that the value has the buffer's dtype and
    shape: an assignment that changes either (``k = k + 0.5``, ``k`` an integer), which ``copy_`` would cast or
    broadcast, fails when the model runs, naming the buffer (on a first call: the module's own forward runs
    instead, :mod:`ipfx.capture.first_call`). The buffer keeps its tensor and takes the new value: what the next
    call and the state dict see."""
    assigned = list(assigned)
    if not assigned:
        return
    output = next(node for node in graph.nodes if node.op == "output")
    with graph.inserting_before(output):
        copies = []
        for path, value in assigned:
            node = graph.get_attr(path)
            for what in ("dtype", "shape"):
                same = graph.call_function(operator.eq, (graph.call_function(builtins.getattr, (value.node, what)),
                                                         graph.call_function(builtins.getattr, (node, what))))
                graph.call_function(torch._assert, (same, f"ipfx: the forward assigns buffer {path} a tensor of "
                                                          f"another {what}, which symbolic capture cannot follow (it "
                                                          "updates buffers in place): transform with example_inputs=..."))
            copies.append((node, graph.call_method("clone", (value.node,))))
        for node, copy in copies:
            graph.call_method("copy_", (node, copy))


def _keyword_mapping(cls: type) -> bool:
    """A dict subclass that ``cls(**fields)`` rebuilds: a dataclass (``ModelOutput``) or an ``OrderedDict``
    without an ``__init__`` of its own."""
    import collections
    import dataclasses

    if dataclasses.is_dataclass(cls):
        return True
    return issubclass(cls, collections.OrderedDict) and cls.__init__ is collections.OrderedDict.__init__


def own_type(m: nn.Module) -> type:
    """The module's class; for a module with parametrized tensors (``ParametrizedConv1d``), the class
    torch.nn.utils.parametrize derived it from."""
    return type(m).__bases__[0] if torch_parametrize.is_parametrized(m) else type(m)


def _kernel_parameter(m: nn.Module):
    """The parameter that holds the module's kernel: ``weight``, or where ``weight`` is parametrized (weight
    norm: ``weight = g * v / |v|``), the largest original (the direction ``v``), which becomes coefficients.
    Read from the dictionaries, not by attribute: the tracer turns attribute reads into graph nodes."""
    weight = m._parameters.get("weight")
    if weight is None and torch_parametrize.is_parametrized(m, "weight"):
        originals = list(m._modules["parametrizations"]._modules["weight"]._parameters.values())
        weight = max(originals, key=lambda p: p.numel(), default=None)
    return weight


def _check_call(m: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise the ``TypeError`` a real call would where the arguments do not fit ``forward``'s signature.

    A leaf becomes a ``call_module`` node without its forward being run, so a call the module refuses
    (a keyword it does not take) would be recorded as if it ran; code that tries one signature and falls
    back to another (``try: layer(x, lengths=l) except TypeError: layer(x)``) must see the error here.
    """
    try:
        signature = inspect.signature(m.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{type(m).__name__}.forward(): {exc}") from None


def _drop_unpatchable_wraps() -> None:
    """Forget torch.fx leaf-function registrations that no trace can honour.

    torch.fx keeps every ``torch.fx.wrap`` registration as (the registering module's globals, a name) and,
    at the start of each trace, looks the name up in those globals. Loading a pickled ``GraphModule``
    whose code checks an argument traced as ``None`` (``torch.fx._symbolic_trace._assert_is_none``, which
    ipfx's guarded graphs use) executes a ``wrap`` of that dotted name with the generated code's globals,
    where no such key exists; from then on every trace in the process fails with a ``KeyError`` (seen
    with torch 2.14: ``torch.load`` of a lowered model, then ``ipfx.transform`` of another model left it
    untraced). Such an entry could never be patched, so dropping it changes nothing else.
    """
    from torch.fx import _symbolic_trace

    registry = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    if not isinstance(registry, dict):
        return
    for key, frame_dict in list(registry.items()):
        name = key[1] if isinstance(key, tuple) and len(key) == 2 else None
        if isinstance(name, str) and isinstance(frame_dict, dict) and name not in frame_dict \
                and not hasattr(builtins, name):
            del registry[key]


def trace(
    model: nn.Module, config: TransformConfig, leaf_modules: Sequence[str | type] = (), name_prefix: str = "",
    pattern: CallPattern | None = None,
) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
    """Trace ``model`` with :class:`WeightTracer`.

    Returns the ``GraphModule`` (named after the model's class, every module keeping the training
    flag of the module it stands for) and the standard modules that were traced through, by path.
    Raises :class:`TraceError` naming the module that failed and how to get past it; its ``module_path``
    is the failing submodule's path ("" when the model's own forward failed). ``pattern``: the optional
    arguments traced as ``None`` (:mod:`ipfx.capture.guards`), recorded on the graph.
    """
    _drop_unpatchable_wraps()
    tracer = WeightTracer(config, leaf_modules, name_prefix)
    # optional arguments that are None are traced as None, and the graph checks each call (ipfx.capture.guards)
    concrete = {name: None for name in pattern.none} if pattern is not None else None
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except Exception as exc:  # torch.fx raises many types; re-raise one, with the cause attached
        if hasattr(tracer, "originals"):
            _put_back(tracer)  # (what the failed trace updated in place: ``self.hits += 1`` ran on the buffer)
        error = TraceError(_trace_failure_message(model, tracer, exc))
        error.module_path = tracer.failed_module[0] if tracer.failed_module else ""
        raise error from exc
    updated, folded = buffers_computed_at_trace(tracer, graph)
    _put_back(tracer)  # what the trace's in-place updates and rebindings of buffers changed
    if updated or folded:  # trace again with every buffer a graph node, as parameters are
        again = WeightTracer(config, leaf_modules, name_prefix)
        again.proxy_buffer_attributes = True
        try:
            graph, tracer, failed = again.trace(model, concrete_args=concrete), again, None
            updated, folded = [name for name in updated if not _updated_in(graph, name)], []
        except Exception as exc:  # noqa: BLE001 - Python control flow on a buffer's value: keep the first graph
            failed = first_line(exc, 160)
            folded = [name for name in folded[:8] if _folds(model, graph, name, lambda: WeightTracer(
                config, leaf_modules, name_prefix), concrete)] + folded[8:]
        _put_back(again)
        if updated:
            warnings.warn(
                f"{type(model).__name__}'s forward updates buffer(s) {', '.join(updated[:4])}, which torch.fx cannot "
                f"capture{f' ({failed})' if failed else ''}: the transformed model computes without those updates "
                "(their values stay as now); "
                "transform with example_inputs=... (torch.export captures buffer updates)", stacklevel=user_stacklevel())
        if folded:
            warnings.warn(
                f"torch.fx traced {type(model).__name__} computing on buffer(s) {', '.join(folded[:4])} as constants "
                f"(their values now), and could not trace them as buffers ({failed}): the transformed model leaves "
                "them out of its state dict and ignores later changes to them; transform with example_inputs=... "
                "(torch.export reads buffers as inputs)", stacklevel=user_stacklevel())
    gm = CapturedGraphModule(tracer.root, graph, class_name=type(model).__name__)
    _keep_whole_state(gm, tracer)
    record_fixed(gm, model)  # what the graph fixed of the model's plain attributes
    # Pickling a GraphModule re-traces its generated code with the recorded tracer class; a plain
    # tracer does that just as well and keeps saved (and lowered) models loadable without ipfx.
    gm._tracer_cls = gm.graph._tracer_cls = None
    install_attention_kernels(gm, tracer.attention)
    keep_aliases(gm, model)
    copy_module_state(gm, model)
    if pattern is not None:
        gm.meta[PATTERN] = pattern.as_tuple()
    return gm, tracer.inlined


def _keep_whole_state(gm: fx.GraphModule, tracer: WeightTracer) -> None:
    """Give ``gm`` the traced module's whole state at its own paths (a graph holds only what it reads, and its
    module's tree only on the way): a module the graph holds nothing of (never called, or read nothing from: a
    head the forward skips, a ReLU with a buffer) is held itself, whole, where it holds parameters or buffers,
    and a module the graph holds in part gets the buffers it lacks, those registered as None included. Without
    that, a buffer the forward never read (a version number, statistics kept for later) and the parameters of a
    module never called were gone from the transformed model's state dict and from its dense lowering, which no
    longer loaded into the model (missing keys); a buffer registered as None was missing for Python code around
    the graph to set (a parent kept as Python code, ``self.c.run = ...``: a plain attribute, gone from the state
    dict) or read (``self.c.run is None``: an AttributeError). A module held whole is the model's own module, as
    :func:`ipfx.capture.pipeline.hold_unreached` holds a convolution no graph reaches: its selected weights are
    converted like every weight no graph reads. A buffer held at two paths is held at both."""
    held = dict(gm.named_modules(remove_duplicate=False))
    for path, module in tracer.root.named_modules():  # (a module's second name: keep_aliases, after)
        target = held.get(path)
        if target is None:
            parent_path, _, name = path.rpartition(".")
            parent = held.get(parent_path)
            if parent is None or hasattr(parent, name):
                continue  # (inside a module held whole, or the name taken: a GraphModule's own graph, code, meta)
            if not any(m._parameters or m._buffers for m in module.modules()):
                continue  # (nothing to keep: a ReLU)
            parent.add_module(name, module)
            held.update((f"{path}.{sub}" if sub else path, m) for sub, m in module.named_modules(remove_duplicate=False))
            continue
        if target is module:
            continue
        for name, buffer in module._buffers.items():
            if name in target._buffers or hasattr(target, name):
                continue
            target.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)


def buffers_computed_at_trace(tracer: WeightTracer, graph: fx.Graph) -> tuple[list[str], list[str]]:
    """The buffers of ``tracer.root`` that torch.fx computed with at trace time. Updated: changed in place
    while tracing (``self.count += 1``, ``self.ema.mul_(m)``) or rebound to another tensor (``self.n = self.n +
    1``), whether or not the graph reads them: the update ran once, on the real buffer, and is not in the graph.
    Folded: read by the forward, not by the graph, where the graph has constants (``self.std.clamp(min=eps)``:
    torch.fx hands the forward a buffer as a plain tensor, so a computation on buffers alone runs at trace time
    and its result becomes a ``_tensor_constant``, which neither ``load_state_dict`` nor later changes reach; the
    buffer, which no node then reads, is gone from the state dict). A buffer read for its shape or dtype only
    makes no constant and changes nothing, and a non-persistent one (a rotary embedding's ``inv_freq``) holds
    no state: not folded."""
    if not tracer.buffers_read:
        return [], []
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    constants = any(str(target).startswith("_tensor_constant") for target in read)
    names: dict[int, str] = {}
    for name, b in tracer.originals:  # a buffer held at two paths: its first, which the graph reads it by
        names.setdefault(id(b), name)
    updated, folded = [], []
    for key, (buffer, version, _) in tracer.buffers_read.items():
        name = names.get(key)
        if name is None:
            continue
        if buffer._version != version or tracer.root.get_buffer(name) is not buffer:
            updated.append(name)
        elif name not in read and constants and _persistent(tracer.root, name):
            folded.append(name)
    return updated, folded


def _put_back(tracer: WeightTracer) -> None:
    """Every buffer the trace read as it was before: its value (an in-place update) and its tensor (a rebinding)."""
    with torch.no_grad():
        _restore_slots(tracer)  # (every slot's tensor, so every rebinding too)
        for buffer, version, value in tracer.buffers_read.values():
            if buffer._version != version:
                buffer.copy_(value)


def _folds(model: nn.Module, graph: fx.Graph, name: str, new_tracer, concrete) -> bool:
    """Whether ``graph`` holds a constant made from buffer ``name``: traced again (by ``new_tracer()``) with the
    buffer's value changed, the graph or one of its constants differs (a buffer read for its size does not)."""
    buffer = model.get_buffer(name)
    saved = buffer.detach().clone()
    tracer = new_tracer()
    try:
        with torch.no_grad():
            buffer.copy_(buffer.logical_not() if buffer.dtype == torch.bool else buffer + 1)
        other = tracer.trace(model, concrete_args=concrete)
    except Exception:  # noqa: BLE001 - the other value takes another path: the graph depends on it
        return True
    finally:
        if hasattr(tracer, "originals"):
            _put_back(tracer)  # (what this trace updated)
        with torch.no_grad():
            buffer.copy_(saved)
    code = lambda g: re.sub(r"_tensor_constant\d+", "_tensor_constant", g.python_code("self").src)  # noqa: E731
    if code(other) != code(graph):
        return True
    constants = lambda g: [getattr(model, n.target) for n in g.nodes  # noqa: E731 - (torch.fx keeps them on the root)
                           if n.op == "get_attr" and str(n.target).startswith("_tensor_constant")]
    return any(not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b))
               for a, b in zip(constants(graph), constants(other)))


def _updated_in(graph: fx.Graph, name: str) -> bool:
    """Whether ``graph`` updates buffer ``name`` in place (``add_``, ``mul_``, ``copy_``, ... on it): then the
    update is captured."""
    on_buffer = {node for node in graph.nodes if node.op == "get_attr" and node.target == name}
    for node in graph.nodes:
        target = str(node.target if node.op == "call_method" else getattr(node.target, "__name__", ""))
        if node.op in ("call_method", "call_function") and target.endswith("_") and not target.endswith("__") \
                and node.args and node.args[0] in on_buffer:
            return True
    return False


def _persistent(root: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr not in root.get_submodule(owner)._non_persistent_buffers_set


def trace_modes(
    model: nn.Module, config: TransformConfig, leaf_modules: Sequence[str | type] = (), name_prefix: str = "",
    pattern: CallPattern | None = None,
) -> tuple[fx.GraphModule | ModeSwitch, dict[str, nn.Module], str | None]:
    """:func:`trace` in the model's own mode and in the other one (:mod:`ipfx.capture.modes`).

    Returns the ``GraphModule`` when both graphs are the same (most models), else a :class:`ModeSwitch`
    holding both; the inlined modules of both traces; and, when only the model's own mode can be
    traced, why the other could not (the result then has the own mode's graph only). A submodule that
    fails in either mode raises :class:`TraceError` as :func:`trace` does.
    """
    # A forward may cache things on its module (torchvision's MultiScaleRoIAlign stores its scales on
    # the first call): a trace would leave proxies there, and the second trace would read them.
    saved = Snapshot(model)
    try:
        gm, inlined = trace(model, config, leaf_modules, name_prefix, pattern)
        saved.restore()
        model.train(not model.training)  # what a user's .train()/.eval() does, overrides included
        other, other_inlined = trace(model, config, leaf_modules, name_prefix, pattern)
    except TraceError as exc:
        if getattr(exc, "module_path", "") or "gm" not in locals() or isinstance(exc.__cause__, SetsBuffers):
            raise
        return gm, inlined, first_line(exc.__cause__ or exc, 200)
    finally:
        saved.restore()
    if other.code == gm.code:
        return gm, inlined, None
    copy_module_state(other, model)
    train, eval = (gm, other) if model.training else (other, gm)
    return ModeSwitch(train, eval, training=model.training), {**other_inlined, **inlined}, None


def copy_module_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give every module of ``gm`` the training flag and non-persistent buffers of its original."""
    originals = dict(model.named_modules())
    flags = {name: m.training for name, m in originals.items()}  # read all before setting any
    for name, module in gm.named_modules():
        if name in originals:
            module.training = flags[name]  # not .train(): that would recurse into shared children
            # GraphModule re-registers every buffer it copies as persistent; keep the original's choice
            for buffer in originals[name]._non_persistent_buffers_set:
                if buffer in module._buffers:
                    module._non_persistent_buffers_set.add(buffer)


def _trace_failure_message(model: nn.Module, tracer: WeightTracer, exc: Exception) -> str:
    reason = first_line(exc, 10_000)
    if tracer.failed_module is not None and tracer.failed_module[0]:
        name, cls = tracer.failed_module
        where = f"module {name!r} ({cls.__name__})"
        hint = (f"mark it as a leaf with ipfx.transform(model, leaf_modules=[{name!r}]) (its own "
                "weights are then left dense), or make its forward traceable by torch.fx")
    else:
        where = f"the forward of {type(model).__name__} itself"
        hint = ("make the forward traceable by torch.fx (no control flow on tensor values), or move "
                "the untraceable part into a submodule and pass it as leaf_modules=[...]")
    return f"torch.fx could not trace {where}: {reason}. To transform this model, {hint}."
