"""The torch.export front end: capture a model as one ATen-level graph per training mode.

``torch.export.export(model, args, kwargs, strict=False)`` runs the model's own Python on fake tensors,
so ``is None`` / ``isinstance`` checks and Python arithmetic on sizes (timm's run-time 'same' padding)
take the branch the real call takes, and parametrizations (weight norm) are traced through. The
result, ``ep.module()``, is a ``GraphModule`` whose parameters and buffers are ``get_attr`` nodes at
their original qualified names and whose kernels are ATen ops (``aten.conv2d.default``,
``aten.linear.default``, ...): the same ``get_attr -> kernel`` pattern a symbolic trace has, read through
:mod:`ipfx.passes.kernels`, so one rewrite pass serves both front ends.

Export captures one mode: batch norm and dropout are recorded as the model was when exported, and
``ep.module().eval()`` is refused. :func:`export_modes` therefore exports in each mode and returns a
:class:`~ipfx.capture.modes.ModeSwitch` over the two graphs when they differ, as symbolic tracing does.

Shapes: every input dimension is exported as ``Dim.AUTO`` (:func:`ipfx.capture.shapes.dynamic_spec`, built for
the forward's real signature), so dimensions the model lets vary (batch, image size, sequence length)
stay symbolic and the graph runs on other sizes; those the model fixes or relates are guarded
(:mod:`ipfx.capture.shape_guards`): a call with another size raises an error naming the input and dimension.
Where that export fails or takes too long (:data:`DYNAMIC_EXPORT_SECONDS`), one with the batch free alone
is tried, then a static one; their guards fix the other sizes. A ``dynamic_shapes``
spec given by the user replaces the automatic one.

Export fixes the call too: the graph takes the example's arguments in the example's layout, and fixes
every non-tensor argument. The example call is recorded on the graphs (:class:`ipfx.capture.guards.ExampleCall`);
calls of another pattern (``labels`` left out where the example gave them) run the model's own forward
on the same coefficients.

Export runs the model's Python, which may cache things on its modules (a detection head storing its
anchors for the shape it saw); every module's attributes are put back afterwards
(:mod:`ipfx.capture.snapshot`), so no fake tensor or shape is left behind.

The graph module is rebuilt as a plain ``fx.GraphModule`` without export's ``_guards_fn`` (a generated
function that cannot be pickled; the guards are graph nodes instead) and without export's refusal of
``train()``/``eval()``.
"""

from __future__ import annotations

import inspect
import signal
import threading
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError, first_line
from .guards import PATTERN, ExampleCall
from .modes import ModeSwitch
from .shape_guards import UnsupportedGuard, guard_conditions, input_names, install_guards, install_norm_checks
from .shapes import dynamic_spec
from .snapshot import Snapshot
from .verify import changing_parameters
from .source_attributes import CapturedGraphModule, keep_aliases, record_fixed

_GUARDS = "_guards_fn"


def export_modes(model: nn.Module, args: tuple, kwargs: dict,
                 dynamic_shapes: Any = None) -> tuple[fx.GraphModule | ModeSwitch, str | None]:
    """Export ``model`` in its own mode and in the other; one graph when both are the same.

    Returns the graph(s) and, where torch.export could not keep every size free, which sizes are and
    why. The model's attributes and training flags are put back afterwards; its tensors are
    shared by the graphs (export lifts the model's own parameters and buffers), so transform works on
    a private copy.
    """
    own = model.training
    mixed = [path for path, m in model.named_modules() if path and m.training != own]
    if mixed:  # (model.train(); model.bn.eval(): a frozen batch norm while fine-tuning)
        raise TraceError(
            f"{type(model).__name__} is in {'train' if own else 'eval'} mode with modules in the other "
            f"({', '.join(mixed[:3])}{' ...' if len(mixed) > 3 else ''}): torch.export fixes every module's mode in "
            "its graph, so a graph of either mode computes something else than the model as it is (a batch norm "
            "updating its statistics, dropout on). Symbolic capture calls those modules in their own modes")
    graphs: dict[bool, fx.GraphModule] = {}
    fixed, level = None, 0
    changing = [(p, p.detach().clone()) for p in changing_parameters(model)]  # (torch.export runs them on the real ones)
    with Snapshot(model) as saved, warnings.catch_warnings():
        # a forward that caches a tensor on itself makes torch warn; the snapshot puts the attribute back
        warnings.filterwarnings("ignore", message="The tensor attribute .* was assigned during export")
        for mode in (own, not own):
            model.train(mode)  # what a user's .train()/.eval() does, overrides included
            program, level, reason = _export(model, args, kwargs, dynamic_shapes, level)
            saved.restore()  # before the next export reads what this one cached (module docstring)
            with torch.no_grad():
                for parameter, value in changing:
                    parameter.copy_(value)
            fixed = reason or fixed
            graphs[mode] = graph_module_of(program, type(model).__name__)
            record_fixed(graphs[mode], model)  # what the graph fixed of the model's plain attributes
            keep_aliases(graphs[mode], model, containers=False)  # a module registered twice: both names
    _copy_training_flags(model, graphs.values())
    pattern = ExampleCall.record(model.forward, args, kwargs)  # the call the graphs take (ipfx.capture.guards)
    for gm in graphs.values():
        if pattern is not None:
            gm.meta[PATTERN] = pattern.as_tuple()
    if graphs[True].code == graphs[False].code:
        return graphs[own].train(own), fixed  # ep.module() comes in train mode whatever the model's was
    return ModeSwitch(graphs[True], graphs[False], training=own), fixed


#: Seconds of this process's CPU time torch.export may take to keep every size free before ipfx keeps only
#: the batch free. Sizes that feed run-time 'same' padding (TensorFlow-style convolutions) grow symbolic
#: expressions that take torch minutes to reason about (3-10 minutes for an EfficientNet, against 1-2 s
#: with a free batch alone), while deep networks that need no such reasoning take tens of seconds
#: (torchvision densenet161: 19 s of CPU time on a busy machine, past the earlier 20 s budget there).
#: CPU time, not wall time: a busy machine must not change what is captured.
DYNAMIC_EXPORT_SECONDS = 60.0

_LEVELS = ("every size", "the batch", "no size")


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
            start: int = 0) -> tuple[torch.export.ExportedProgram, int, str | None]:
    """The program with every size free where the model allows; else with the batch free; else static.

    Returns the program, its level (an index into ``_LEVELS``; the other mode starts there) and, below
    the first, why sizes are fixed. A user's spec is used as it is.
    """
    if dynamic_shapes is not None:
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False), 0, None
        except Exception as exc:  # the user's own spec: its error is the one to see
            raise TraceError(f"torch.export could not capture {type(model).__name__} with the dynamic_shapes "
                             f"given: {first_line(exc)}") from exc
    reasons = []
    for level in range(start, len(_LEVELS)):
        spec = None if level == 2 else dynamic_spec(model.forward, args, kwargs, batch_only=level == 1)
        try:
            program = within(DYNAMIC_EXPORT_SECONDS if level == 0 else None,
                             lambda: torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False))
        except OverBudget:
            reasons.append(f"keeping {_LEVELS[level]} free took torch.export over {DYNAMIC_EXPORT_SECONDS:g} s of CPU time")
            continue
        except Exception as exc:  # noqa: BLE001 - a less dynamic export may still succeed
            if level == len(_LEVELS) - 1:
                raise TraceError(f"torch.export could not capture {type(model).__name__}: {first_line(exc)}") from exc
            reasons.append(f"with {_LEVELS[level]} free: {first_line(exc)}")
            continue
        fixed = None if level == 0 else (f"{'only the batch is' if level == 1 else 'no size is'} free: "
                                         + "; ".join(reasons))
        return program, level, fixed
    raise AssertionError("unreachable")


def _copy_training_flags(model: nn.Module, graphs) -> None:
    """Give each graph's modules the training flag of the model's module at their path. ``ep.module()``
    builds them in train mode; the exported graphs do not read the flags (each mode is its own graph), but
    the model's own forward, run for calls of another pattern (:mod:`ipfx.capture.guards`), takes them from here."""
    flags = {path: m.training for path, m in model.named_modules()}
    for gm in graphs:
        for path, module in gm.named_modules():
            if path in flags:
                module.training = flags[path]


class OverBudget(BaseException):
    """Raised into a computation that ran past its time (a BaseException: torch's handlers of Exception
    must not take it for an export error of their own)."""


def within(seconds: float | None, call):
    """``call()``, interrupted by :class:`OverBudget` after ``seconds`` of this process's CPU time (by
    SIGPROF, so the same model gets the same capture on a quiet and on a busy machine: only in the main
    thread of a POSIX process; elsewhere, and for ``None``, without a limit)."""
    if (seconds is None or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        return call()

    expired = []

    def expire(signum, frame):
        expired.append(True)
        raise OverBudget()

    previous = signal.signal(signal.SIGPROF, expire)
    outer = signal.setitimer(signal.ITIMER_PROF, seconds)[0]  # a timer someone else set: put back after
    try:
        result = call()
        left = signal.setitimer(signal.ITIMER_PROF, 0)[0]
        # expired: the interruption was caught by the callee (a handler of BaseException), or its signal is
        # still pending (Python runs handlers between bytecodes): over budget all the same
        if expired or left == 0:
            raise OverBudget()
        return result
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        if outer:
            signal.setitimer(signal.ITIMER_PROF, max(outer - seconds, 1e-3))


def graph_module_of(program: torch.export.ExportedProgram, class_name: str = "GraphModule") -> fx.GraphModule:
    """``program.module()`` as a plain ``fx.GraphModule`` (module docstring), training flags live."""
    exported = program.module()
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == _GUARDS:
            graph.erase_node(node)
    gm = CapturedGraphModule(exported, graph, class_name=class_name)
    gm._tracer_cls = gm.graph._tracer_cls = None
    install_norm_checks(gm)
    try:
        install_guards(gm, _conditions(program, exported, gm))
    except UnsupportedGuard as exc:  # rare: capture="auto" then traces symbolically, and says why
        raise TraceError(f"torch.export recorded a shape condition ipfx cannot keep in the graph ({exc})") from exc
    # GraphModule registers every tensor it copies as a persistent buffer; export's lifted constants
    # (lifted_tensor_N) and the model's non-persistent buffers are not in the state dict, and stay out
    persistent = set(exported.state_dict())
    for name, _ in list(gm.named_buffers()):
        if name not in persistent:
            owner, _, leaf = name.rpartition(".")
            gm.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    return gm


def _conditions(program: torch.export.ExportedProgram, exported: nn.Module, gm: fx.GraphModule) -> list:
    """The guards of ``program`` (:mod:`ipfx.capture.shape_guards`) over ``gm``'s placeholders."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    example = getattr(program, "example_inputs", None)
    names = None
    if example is not None:
        try:
            signature = inspect.signature(exported.forward)
        except (TypeError, ValueError):
            signature = None
        names = input_names(signature, *example)
        if len(names) != len(placeholders):
            names = None
    if names is None:  # no example recorded: messages name the placeholders, the tracer's guards are unusable
        return guard_conditions(placeholders, program.range_constraints, [], [(n.name, n.name) for n in placeholders])
    return guard_conditions(placeholders, program.range_constraints, list(getattr(program, "_guards_code", [])), names)
