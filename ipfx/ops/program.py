"""A loaded program's graph run as one native call (:func:`install`; the last step of
:func:`ipfx.deploy.load_module`).

The forward that ``torch.fx`` generates runs the interpreter between every two kernels: a module call, its
``forward``, the plan lookup, an aten operator's Python binding. On a batch-1 mobilenet_v3_large at 95% that
is a third of the main thread, and the second thread waits through it. A *program* (``Program`` of the
native library, ``csrc/program.h``) holds the graph's steps in order and runs them from one C++ loop:

* a fused conv whose plan is the native kernel (:func:`ipfx.ops.library.conv_plan`): the plan's bound kernel
  (``BoundConv``), called as the plan calls it (contiguous input and residual, the activation's code); and a
  1x1 conv whose output only a grouped conv reads, with that conv, as one step (:func:`_pointwise_pairs`);
* an aten operator (``OpOverload``) returning one tensor, whose tensor arguments are nodes: called boxed
  through the dispatcher, its constant arguments converted once by the operator's schema; likewise a
  :class:`~ipfx.ops.pooling.GlobalAvgPool2d` whose eager path is the native channel mean, and a
  :class:`~ipfx.ops.SparseLinear` whose plan is the native linear (those ops);
* any other node (other modules, Python functions, attribute reads): the same call from C++ into Python;
* but not torch.export's input guards (assertions on the inputs' sizes, which a program's signature fixes):
  they run when the program is built (:func:`_input_guards`).

At a batch of a multiple of the native vector's float32 lanes (16 with AVX-512) the convs, max pools and
elementwise ops between them keep their values in the batch-blocked layout (:mod:`ipfx.ops.blocked`, which
decides the steps; a value is converted once where a step needs the other layout, and outputs are NCHW).

The steps are the graph's nodes with the same kernels and arguments, so the outputs are the generated
forward's bit for bit (on the blocked layout too, but where a conv's NCHW call sums on the gather path in
tiles of 16 or 32 positions: ``c_in * K`` over 2048 on small maps, where the blocked conv sums the same
products in the direct path's order). A program is made for one input *signature* (each input's shape, strides, dtype and
device, and ``IPFX_AUTOTUNE``), on the first call with it, by running the graph node by node in Python (that
call's result), and kept (the last :data:`PROGRAMS_KEPT` signatures). Before its first step it checks
its guards: everything a conv step was built from (the module's place in the module tree, its class, buffers,
bias, activation and geometry, the in-place versions and data addresses of its tensors, no hooks on it) and the place of every
other module it calls. A changed one (``load_state_dict``, ``.to()``, an in-place edit, a replaced or hooked
submodule) makes the program return without running anything, and a new one is built from the model as it is.
What a module run in Python reads is not guarded (another stride on such a module, say): where that changes
the shapes that reach a native conv step, its kernel refuses them (:func:`ipfx.ops.native.binding_mismatch`)
and the program is built again from the model as it is, that call's Python steps before it having run twice.

It runs in eager inference only (no autograd, no autocast, nothing compiling or tracing, no global module
hooks, plain tensors passed positionally); any other call is the generated forward's. ``recompile()`` and
deep copies give a module the generated forward again. Measured: a loaded mobilenet_v3_large at 95% runs in
0.67x the time of the generated forward at batch 1 (2 threads, median of 5 interleaved rounds, 0.63-0.86).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import blocked, epilogue, native
from .modules import SparseIPConv, SparseLinear, _bias
from .order import ORDER_AUTO, autotune_setting
from .pooling import GlobalAvgPool2d, MaxPool2d, channel_mean_applies, native_geometry

#: Input signatures a module keeps a program for; a call with another drops the oldest.
PROGRAMS_KEPT = 8

#: Whether a program runs a pointwise conv and the grouped conv that alone reads its output as one step
#: (:func:`_pointwise_pairs`). Measured on mobilenet_v3_large at 95% (SP, the frozen fused lowering loaded from
#: its .pt2; all 14 of its expansion + depthwise pairs; 2 threads, AMD EPYC Zen 5 with AVX-512, one process,
#: 6 interleaved rounds, fused / unfused): batch 32 0.70x (51.2 -> 35.8 ms), batch 1 0.76x (2.10 -> 1.56 ms);
#: outputs bit-equal.
FUSE_POINTWISE_GROUPED = True

#: What a conv step depends on besides its tensors (checked before every run).
_CONV_STATE = ("activation", "weight_shape", "stride", "padding", "dilation", "groups", "transposed",
               "output_padding", "bias", "forward", "_buffers", "_parameters", "_modules")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(getattr(_module_globals, f"_global{name}") for name in _HOOKS
                      if hasattr(_module_globals, f"_global{name}"))


def install(gm: nn.Module) -> bool:
    """Give ``gm`` the program forward (module docstring); False, and nothing done, where the native kernel is
    not available or ``gm``'s forward is not one ``torch.fx`` generated for a graph of flattened inputs and
    outputs (a pytree code generator, as ``torch.export`` programs have; the forward on its own class)."""
    if not isinstance(gm, fx.GraphModule) or not native.available():
        return False
    if type(gm.graph._codegen) is not fx.graph._PyTreeCodeGen:
        return False
    cls = type(gm)
    if "forward" not in cls.__dict__ or "forward" in gm.__dict__ or programs_of(gm) is not None:
        return False
    cls.forward = _program_forward(cls.forward)
    return True


def _program_forward(generated: Callable) -> Callable:
    programs: dict = {}  # signature -> Program, or None where the graph has none (the generated forward runs)

    def forward(self, *args, **kwargs):
        flat = _flat_inputs(self, args) if not kwargs and _eager_inference_now() else None
        key = None if flat is None else _signature(flat)
        if key is None:
            return generated(self, *args, **kwargs)
        program = programs.get(key, False)
        if program is None:
            return generated(self, *args, **kwargs)
        if program is not False:
            try:
                out = program.run(flat)
            except ValueError as e:  # a conv step met other shapes than it was bound for: build again (below)
                if not native.binding_mismatch(e):
                    raise
                out = None
            if out is not None:
                return self.graph._codegen.process_outputs(out)
        program, out = _build(self, flat)
        programs.pop(key, None)
        while len(programs) >= PROGRAMS_KEPT:
            programs.pop(next(iter(programs)), None)
        programs[key] = program
        return self.graph._codegen.process_outputs(out)

    forward.__wrapped__ = generated  # (inspect.signature shows the generated forward's arguments)
    forward.__doc__ = generated.__doc__
    forward.programs = programs  # (programs_of)
    return forward


def programs_of(gm: nn.Module) -> Optional[dict]:
    """The programs ``gm``'s forward keeps, by input signature (None where a signature has none), or None where
    :func:`install` has not given it the program forward (or a recompile has taken it away)."""
    return getattr(type(gm).__dict__.get("forward"), "programs", None)


#: whether fx's symbolic tracer is running (the newer name; the older one also warns under torch.export)
_symbolic_tracing = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing", fx._symbolic_trace.is_fx_tracing)


def _autocast_now() -> bool:
    """Whether autocast is on for any device: it changes the dtypes the aten steps return, so a program built
    without it would hand a conv step another dtype than its tensors' (a float32 program under CPU bf16
    autocast raised in the native kernel), and one built with it would round where a plain call does not."""
    any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
    if any_enabled is not None:
        return any_enabled()
    return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _eager_inference_now() -> bool:
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or _symbolic_tracing()
                or torch._C._get_tracing_state() is not None or any(_GLOBAL_HOOKS) or _autocast_now())


def _flat_inputs(gm: fx.GraphModule, args: tuple) -> Optional[list]:
    """The graph's placeholders' values for the call ``gm(*args)``, as the generated forward flattens them, or
    None where that forward would bind them otherwise (then it runs, and raises what it raises)."""
    info = gm.graph._codegen.pytree_info
    if len(args) != len(info.orig_args) or info.in_spec is None:
        return None
    try:
        return fx_pytree.tree_flatten_spec((list(args), {}), info.in_spec)
    except Exception:  # noqa: BLE001  (a structure the spec does not take: the generated forward raises)
        return None


def _signature(flat: list) -> Optional[tuple]:
    key = [autotune_setting()]
    for t in flat:
        if type(t) is not Tensor:
            return None
        key.append((t.shape, t.stride(), t.dtype, t.device))
    return tuple(key)


class _Call:
    """A Python step: ``fn(*args, **kwargs)`` with the graph's nodes in them given as the step's inputs."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, inputs: list):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.at = {node: i for i, node in enumerate(inputs)}

    def __call__(self, *values):
        fill = lambda node: values[self.at[node]]  # noqa: E731
        return self.fn(*fx.node.map_arg(self.args, fill), **fx.node.map_arg(self.kwargs, fill))


class _Attribute:
    """A Python step reading ``root.<target>`` now (a get_attr node), through a weak reference to the root: the
    program must not keep its own module alive."""

    def __init__(self, root: nn.Module, target: str):
        self.root, self.target = weakref.ref(root), target

    def __call__(self):
        value = self.root()
        for name in self.target.split("."):
            value = getattr(value, name)
        return value


def _build(gm: fx.GraphModule, flat: list) -> tuple[Any, list]:
    """Run ``gm``'s graph on ``flat`` node by node and make its program; returns (program or None, outputs).
    An error of the graph's own (a guard on the inputs, an operator's) propagates as the generated forward's
    would."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if len(placeholders) != len(flat):
        raise TypeError(f"this graph takes {len(placeholders)} inputs, got {len(flat)}")
    value: dict[fx.Node, Any] = dict(zip(placeholders, flat))
    meta = {n: (tuple(v.shape), v.dtype) for n, v in value.items() if type(v) is Tensor}  # (blocked.plan)
    slot: dict[fx.Node, int] = {n: i for i, n in enumerate(placeholders)}
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_reader = {n: max(n.users, key=position.__getitem__) for n in gm.graph.nodes if n.users}
    steps: list[tuple] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.users:
            slot[node] = len(slot)
        value[node], step = _evaluate(gm, node, value)
        if type(value[node]) is Tensor:
            meta[node] = (tuple(value[node].shape), value[node].dtype)
        steps.append((node, step))
        for read in node.all_input_nodes:  # (as the generated forward drops each value after its last use)
            if last_reader[read] is node:
                value.pop(read, None)
    outs = output.args[0]  # (a pytree graph's: the flat outputs)
    flat_outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    results = [fx.node.map_arg(o, value.__getitem__) for o in flat_outs]
    if not all(isinstance(o, fx.Node) for o in flat_outs):
        return None, results
    pairs = _pointwise_pairs(steps) if FUSE_POINTWISE_GROUPED else {}
    runs, held = blocked.plan(steps, meta, native.runs_blocked, keep=set(pairs) | {a for a, _ in pairs.values()})
    try:
        program = _emit(gm, steps, slot, meta, len(flat), flat_outs, pairs, runs, held)
    except _NotBlocked:  # a step planned on the blocked layout that its op cannot take: all NCHW
        program = _emit(gm, steps, slot, meta, len(flat), flat_outs, pairs, set(), set())
    return program, results


class _NotBlocked(Exception):
    """A step the blocked plan put on the layout that cannot run there (:func:`_emit`)."""


def _emit(gm: fx.GraphModule, steps: list, slot: dict, meta: dict, inputs: int, flat_outs: list, pairs: dict,
          runs: set, held: set):
    """The program of ``steps`` (:func:`_build`), with the steps of ``runs`` on the blocked layout and the values
    of ``held`` kept in it."""
    inside = {a for a, _ in pairs.values()}
    # (a value is converted at most once, to the layout it is not held in: one more slot per tensor at most)
    program = native.new_program(len(slot) + len(meta), inputs)
    guards = _Guards(program)
    names = []  # each step's node, for profiles (Program.step_seconds)
    converted: dict[fx.Node, int] = {}  # node -> the slot of its value in the layout it is not held in

    def read(node: fx.Node, in_blocked: bool) -> int:
        """The slot of ``node``'s value in the layout asked for, converting it (once) where it is held in the
        other."""
        if (node in held) == in_blocked:
            return slot[node]
        if node not in converted:
            converted[node] = len(slot) + len(converted)
            op = blocked.to_blocked_op() if in_blocked else blocked.from_blocked_op()
            program.add_op(op._schema.name, op._schema.overload_name, [None], [(0, slot[node])], converted[node])
            names.append(f"{node.name} ({'to' if in_blocked else 'from'} blocked)")
        return converted[node]

    for node, step in steps:
        out = slot.get(node, -1)  # (a node nobody reads has no slot)
        kind = step[0]
        on_blocked = node in runs
        if kind == "conv":
            _, _, bound, x, residual, tensors = step
            guards.conv(gm, node.target, tensors)
            if node in inside:  # (run in the step of the grouped conv that reads it)
                continue
            residual_slot = -1 if residual is None else read(residual, on_blocked)
            if node in pairs:
                a_step = pairs[node][1]
                program.add_fused(a_step[2][0], a_step[2][1], bound[0], read(a_step[3], False), residual_slot,
                                  bound[1], out)
            else:
                program.add_conv(bound[0], read(x, on_blocked), residual_slot, bound[1], out, on_blocked)
            names.append(node.name)
            continue
        if kind == "op":
            _, op, arguments, places = step[:4]
            if node.op == "call_module":  # (a module run as its op: _pool_step, _max_pool_step, _linear_step)
                guards.module(gm, node.target, ("forward", *step[4], "bias", "_buffers", "_parameters"), step[5])
            if on_blocked and blocked.blocked_form(op) is not None:
                op = blocked.blocked_form(op)[0]
            try:
                program.add_op(op._schema.name, op._schema.overload_name, arguments,
                               [(i, read(n, on_blocked)) for i, n in places], out)
                names.append(node.name)
                continue
            except (TypeError, RuntimeError, ValueError):  # an argument it cannot take: a Python step
                if on_blocked and op not in blocked.LAYOUT_FREE:
                    raise _NotBlocked(node.name)
                step = _python_step(gm, node)  # (an elementwise op on the blocked values: x * 0.5)
        _, fn, inputs = step
        if node.op == "call_module":
            module = guards.path(gm, node.target)
            if _input_guards(module, node):  # (passed in this build, and bound to pass for this signature)
                guards.item(module.__dict__, "forward")
                continue
        program.add_python(fn, [read(n, on_blocked) if n in meta else slot[n] for n in inputs], out)
        names.append(node.name)
    program.set_outputs([read(o, False) if o in meta else slot[o] for o in flat_outs])
    program.nodes = names
    return program


def _pointwise_pairs(steps: list) -> dict:
    """{grouped conv node: (pointwise conv node, its step)} for each conv step whose input is the output of a
    pointwise conv step without a residual that nothing else reads, where the native kernel runs the two as one
    (:func:`ipfx.ops.native.pointwise_feeds_grouped`: an SP 1x1 conv and an SP grouped conv, such as an inverted
    residual block's expansion and depthwise conv). The pointwise conv's output is then never stored (at batch 32,
    mobilenet_v3_large's first expansion writes 103 MB its depthwise conv reads back): each of its channels is
    made where the grouped conv lays it out, and not at all where that channel's group keeps no coefficient
    (most of a 3x3 depthwise conv's channels at 95%). The numbers are those of the two steps one after the
    other, bit for bit (:data:`FUSE_POINTWISE_GROUPED` for the time)."""
    convs = {node: step for node, step in steps if step[0] == "conv"}
    pairs = {}
    for node, step in steps:
        if step[0] != "conv":
            continue
        x, residual = step[3], step[4]
        a = convs.get(x)
        if a is None or a[4] is not None or residual is x or len(x.users) != 1:
            continue
        if native.pointwise_feeds_grouped(a[2][0], step[2][0]):
            pairs[node] = (x, a)
    return pairs


try:  # the module torch.export puts first in an unlifted program's graph: asserts on its inputs' sizes
    from torch.export._unlift import GuardsFn as GUARDS_FN
except ImportError:  # (torch before 2.9 has none)
    GUARDS_FN = None


def _input_guards(module: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` calls torch.export's input guards (a ``GuardsFn``, its result unused): assertions on the
    inputs' sizes, which a program's signature fixes, so they hold on every call of a program whose build
    passed them, and the program leaves them out (53 us of a batch-1 mobilenet_v3_large's 3 ms). Replacing the
    module, or its forward, makes a new program."""
    return GUARDS_FN is not None and type(module) is GUARDS_FN and not node.users


def _evaluate(gm: fx.GraphModule, node: fx.Node, value: dict) -> tuple[Any, tuple]:
    """``node``'s value, computed as the generated forward computes it, and its step."""
    args = fx.node.map_arg(node.args, value.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, value.__getitem__)
    if node.op == "get_attr":
        fn = _Attribute(gm, node.target)
        return fn(), ("python", fn, [])
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        result = module(*args, **kwargs)
        return result, (_conv_step(module, node, args, kwargs) or _pool_step(module, node, args, kwargs)
                        or _max_pool_step(module, node, args, kwargs) or _linear_step(module, node, args, kwargs)
                        or _python_step(gm, node, module))
    result = node.target(*args, **kwargs)
    return result, _op_step(node, value) or _python_step(gm, node)


def _python_step(gm: fx.GraphModule, node: fx.Node, module: Optional[nn.Module] = None) -> tuple:
    inputs = list(node.all_input_nodes)
    if node.op == "call_module":
        fn = module if module is not None else gm.get_submodule(node.target)
    else:
        fn = node.target
    return "python", _Call(fn, node.args, node.kwargs, inputs), inputs


def _conv_step(module: nn.Module, node: fx.Node, args: tuple, kwargs: dict) -> Optional[tuple]:
    """The native conv step of a :class:`SparseIPConv` call ``module(x, order=..., residual=...)`` whose plan
    (the one its eager path just used) is the bound native kernel with the epilogue in it; else None."""
    if type(module) is not SparseIPConv or len(node.args) != 1 or not set(node.kwargs) <= {"order", "residual"}:
        return None
    x, residual = args[0], kwargs.get("residual")
    order = kwargs.get("order", ORDER_AUTO)
    if type(x) is not Tensor or not (residual is None or type(residual) is Tensor) or type(order) is not int:
        return None
    if any(getattr(module, hooks) for hooks in _HOOKS):
        return None
    activation = module.__dict__.get("activation", "none")
    plan = module._plan(x, order, activation)
    bound = getattr(plan, "bound", None)
    if bound is None or (residual is not None and not epilogue.in_kernel(residual, bound[2], x.dtype)):
        return None
    buffers = module._buffers
    tensors = [t for t in (buffers.get("values"), buffers.get("indices"), buffers.get("basis"),
                           _bias(module)) if isinstance(t, Tensor)]
    residual_node = node.kwargs.get("residual")
    return "conv", module, bound, node.args[0], residual_node, tensors


def _plain_call(module: nn.Module, cls: type, args: tuple, kwargs: dict) -> bool:
    """``module`` is exactly a ``cls``, called on one plain tensor, with no hooks and its class's forward: a call
    a step may make in its place (its guards then hold it so: :meth:`_Guards.module`)."""
    return (type(module) is cls and len(args) == 1 and not kwargs and type(args[0]) is Tensor
            and not any(getattr(module, hooks) for hooks in _HOOKS) and "forward" not in module.__dict__)


def _pool_step(module: nn.Module, node: fx.Node, args: tuple, kwargs: dict) -> Optional[tuple]:
    """The boxed ``ipfx_native::channel_mean`` step of a :class:`~ipfx.ops.pooling.GlobalAvgPool2d` call whose
    eager path (just run) was that op; else None."""
    if not _plain_call(module, GlobalAvgPool2d, args, kwargs):
        return None
    if module.output_size not in (1, (1, 1)) or not channel_mean_applies(args[0]):
        return None
    return "op", torch.ops.ipfx_native.channel_mean.default, [None], [(0, node.args[0])], ("output_size",), []


def _max_pool_step(module: nn.Module, node: fx.Node, args: tuple, kwargs: dict) -> Optional[tuple]:
    """The boxed ``ipfx_native::max_pool2d`` step of a :class:`~ipfx.ops.pooling.MaxPool2d` call whose eager path
    (just run) was that op, its geometry (for this signature's input size) as constants; else None."""
    if not _plain_call(module, MaxPool2d, args, kwargs) or module.return_indices:
        return None
    geometry = native_geometry(args[0], module.kernel_size, module.stride, module.padding, module.dilation,
                               module.ceil_mode)
    if geometry is None:
        return None
    return ("op", torch.ops.ipfx_native.max_pool2d.default, [None, *(list(g) for g in geometry)],
            [(0, node.args[0])], ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"), [])


def _linear_step(module: nn.Module, node: fx.Node, args: tuple, kwargs: dict) -> Optional[tuple]:
    """The boxed ``ipfx_native::linear`` step of a :class:`SparseLinear` call on a contiguous 2-d input whose
    plan (the one its eager path just used) is that op, its CSR and bias as constants; else None."""
    if not _plain_call(module, SparseLinear, args, kwargs) or args[0].dim() != 2 or not args[0].is_contiguous():
        return None
    memo = module.__dict__.get("_last_plan_memo")
    bound = getattr(memo[1], "bound", None) if memo is not None else None
    if bound is None:
        return None
    buffers = module._buffers
    tensors = [t for t in (buffers.get("values"), buffers.get("indices"), _bias(module)) if isinstance(t, Tensor)]
    return ("op", torch.ops.ipfx_native.linear.default, [None, *bound], [(0, node.args[0])], ("weight_shape",),
            tensors)


def _op_step(node: fx.Node, value: dict) -> Optional[tuple]:
    """The boxed step of an aten operator returning one tensor whose node arguments are tensors at the top
    level; else None. ``arguments``: one per schema argument (defaults filled in), None where a node is;
    ``places``: (argument position, node)."""
    op = node.target
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
        return None
    schema = op._schema
    if len(schema.returns) != 1 or str(schema.returns[0].type) != "Tensor":
        return None
    arguments, places = [], []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            given = node.args[i]
        elif arg.name in node.kwargs:
            given = node.kwargs[arg.name]
        elif arg.has_default_value():
            given = arg.default_value
        else:
            return None
        if isinstance(given, fx.Node):
            if type(value[given]) is not Tensor:
                return None
            places.append((i, given))
            given = None  # (the slot's value on each call; the build's is not kept)
        else:
            nested: list = []
            fx.node.map_arg(given, nested.append)
            if nested:  # (a node inside a list: not a constant)
                return None
        arguments.append(given)
    if len(node.args) > sum(not a.kwarg_only for a in schema.arguments):
        return None
    return "op", op, arguments, places


class _Guards:
    """The program's guards (module docstring), each ``dict[key]`` once."""

    def __init__(self, program):
        self.program, self.seen = program, set()

    def item(self, d: dict, key: str) -> None:
        if (id(d), key) in self.seen:
            return
        self.seen.add((id(d), key))
        if key in d:
            self.program.guard_item(d, key, d[key], False)
        else:
            self.program.guard_item(d, key, None, True)

    def path(self, root: nn.Module, target: str) -> nn.Module:
        """Each module on the way to ``root.<target>`` holds the next as the same child."""
        module = root
        for name in target.split("."):
            self.item(module.__dict__, "_modules")
            self.item(module._modules, name)
            module = module._modules[name]
        return module

    def module(self, root: nn.Module, target: str, attributes, tensors: list, buffers=None) -> None:
        """A module a step runs: its place in the tree, its class, the ``attributes`` of its ``__dict__`` and the
        ``buffers`` (default: those it has) the step was built from, its bias parameter, no hooks, and the
        in-place versions and data addresses of ``tensors``."""
        module = self.path(root, target)
        self.program.guard_type(module, type(module))
        for key in attributes:
            self.item(module.__dict__, key)
        for key in list(module._buffers) if buffers is None else buffers:
            self.item(module._buffers, key)
        self.item(module._parameters, "bias")
        for hooks in _HOOKS:
            self.item(module.__dict__, hooks)
            self.program.guard_empty(getattr(module, hooks))
        for t in tensors:
            self.program.guard_version(t)

    def conv(self, root: nn.Module, target: str, tensors: list) -> None:
        self.module(root, target, _CONV_STATE, tensors, ("values", "indices", "basis", "bias"))
