"""The torch.export front end: capture a model as one ATen-level graph per training mode.

``torch.export.export(model, args, kwargs, strict=False)`` runs the model's own Python on fake tensors,
so ``is None`` / ``isinstance`` checks and Python arithmetic on sizes (timm's run-time 'same' padding)
take the branch the real call takes, and parametrizations (weight norm) are traced through. The
result, ``ep.module()``, is a ``GraphModule`` whose parameters and buffers are ``get_attr`` nodes at
their original qualified names and whose kernels are ATen ops (``aten.conv2d.default``,
``aten.linear.default``, ...): the same ``get_attr -> kernel`` pattern a symbolic trace has, read through
:mod:`ipfx.kernels`, so one rewrite pass serves both front ends.

Export captures one mode: batch norm and dropout are recorded as the model was when exported, and
``ep.module().eval()`` is refused. :func:`export_modes` therefore exports in each mode and returns a
:class:`~ipfx.modes.ModeSwitch` over the two graphs when they differ, as symbolic tracing does.

Shapes: every input dimension is exported as ``Dim.AUTO``, so dimensions the model lets vary (batch,
image size, sequence length) stay symbolic and the graph runs on other sizes; those the model fixes
are specialised (size 0/1 examples always are: give examples with a batch of 2 or more). Where the
dynamic export fails, a static one is tried.

The graph module is rebuilt as a plain ``fx.GraphModule`` without export's input guard (a module that
cannot be pickled or deep-copied) and without export's refusal of ``train()``/``eval()``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .errors import TraceError
from .modes import ModeSwitch
from .source_attributes import CapturedGraphModule

_GUARDS = "_guards_fn"


def export_modes(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule | ModeSwitch:
    """Export ``model`` in its own mode and in the other; one graph when both are the same.

    The model's training flags are put back afterwards; its tensors are shared by the graphs (export
    lifts the model's own parameters and buffers), so transform works on a private copy.
    """
    own = model.training
    graphs: dict[bool, fx.GraphModule] = {}
    flags = {m: m.training for m in model.modules()}
    try:
        for mode in (own, not own):
            model.train(mode)  # what a user's .train()/.eval() does, overrides included
            graphs[mode] = graph_module_of(_export(model, args, kwargs), type(model).__name__)
    finally:
        for m, flag in flags.items():
            m.training = flag
    if graphs[True].code == graphs[False].code:
        return graphs[own].train(own)  # ep.module() comes in train mode whatever the model's was
    return ModeSwitch(graphs[True], graphs[False], training=own)


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=_auto_shapes(args, kwargs), strict=False)
    except Exception:  # noqa: BLE001 - a static export may still succeed; its error is the one reported
        pass
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        raise TraceError(f"torch.export could not capture {type(model).__name__}: {reason}") from exc


def _auto_shapes(args: tuple, kwargs: dict):
    """``Dim.AUTO`` for every dimension of every tensor input (``None`` for everything else)."""
    def spec(value):
        if isinstance(value, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(value.dim())}
        return None

    return (pytree.tree_map(spec, tuple(args)), pytree.tree_map(spec, dict(kwargs)))


def graph_module_of(program: torch.export.ExportedProgram, class_name: str = "GraphModule") -> fx.GraphModule:
    """``program.module()`` as a plain ``fx.GraphModule`` (module docstring), training flags live."""
    exported = program.module()
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == _GUARDS:
            graph.erase_node(node)
    gm = CapturedGraphModule(exported, graph, class_name=class_name)
    gm._tracer_cls = gm.graph._tracer_cls = None
    # GraphModule registers every tensor it copies as a persistent buffer; export's lifted constants
    # (lifted_tensor_N) and the model's non-persistent buffers are not in the state dict, and stay out
    persistent = set(exported.state_dict())
    for name, _ in list(gm.named_buffers()):
        if name not in persistent:
            owner, _, leaf = name.rpartition(".")
            gm.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    return gm
