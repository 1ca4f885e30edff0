"""Transform a model that torch.fx cannot trace as a whole: trace the largest traceable parts.

Strategy, per module (starting at the root):

1. trace it; when a submodule's forward fails (data-dependent control flow, iteration over a proxy,
   ...), mark that submodule as a leaf and trace again, so everything around it stays in the graph;
2. once the trace succeeds, record it as a part (its weights are rewritten afterwards, by the rewrite
   pass) and recurse into every submodule that had to become a leaf, replacing it inside the graph
   module by its own captured version;
3. when the module's *own* forward cannot be traced, keep it as Python code and recurse into its
   children instead; a child ``nn.Sequential`` of such code is opened the same way, since that code
   may iterate it and call its entries itself. Modules without any convolution, linear or attention
   layer are left as they are: they have nothing to rewrite;
4. a module of a class that a library hooks at run time (:data:`HOOKED_AT_RUN_TIME`: Hugging Face records
   hidden states and attentions with forward hooks it installs at the first call that asks for them) is
   a leaf of every trace and kept as Python code, its children captured: a graph traced through it would
   not call it, so the hooks would never run and the outputs they record would be missing.

Every weight reached by some trace is rewritten there; weights read directly by untraceable Python code
get the parametrized coefficient form (:mod:`ipfx.form.parametrize`). The result computes what the model
computed: untraced code calls the same children, now captured, and each traced part preserves its outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from ..config import TransformConfig
from ..errors import TraceError, first_line
from .guards import pattern_for
from .modes import ModeSwitch, graphs_of
from .source_attributes import keep_source
from .tracing import STANDARD_TYPES, own_type, trace_modes


OPENED = "an nn.Sequential reached from Python code, which may iterate it: its entries are captured one by one"
HOOKED = "a library hooks this class at run time (HOOKED_AT_RUN_TIME): its calls stay module calls"


def _hugging_face_recorders(model: nn.Module) -> Iterable[type | str]:
    """The classes whose outputs Hugging Face models record with forward hooks (``_can_record_outputs``:
    a class, a class name matched as a suffix of the module's path, or an ``OutputRecorder`` of either)."""
    for m in model.modules():
        table = getattr(type(m), "_can_record_outputs", None)
        for specs in table.values() if isinstance(table, dict) else ():
            for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
                if isinstance(spec, (type, str)):
                    yield spec
                else:
                    yield from (v for v in (getattr(spec, "target_class", None), getattr(spec, "class_name", None))
                                if isinstance(v, (type, str)))


#: Per library, the module classes it installs forward hooks on at run time (module docstring, step 4).
HOOKED_AT_RUN_TIME: tuple[Callable[[nn.Module], Iterable[type | str]], ...] = (_hugging_face_recorders,)


def hooked_classes(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """Whether the module at a path of ``model`` is of a class some library hooks at run time."""
    found = [c for source in HOOKED_AT_RUN_TIME for c in source(model)]
    types = tuple({c for c in found if isinstance(c, type)})
    names = tuple({c for c in found if isinstance(c, str)})
    return lambda path, m: bool(path) and ((bool(types) and isinstance(m, types))
                                           or any(path.endswith(n) for n in names))


@dataclasses.dataclass
class Part:
    """One captured graph: where it sits in the model, and the standard modules traced through."""

    path: str
    holder: fx.GraphModule | ModeSwitch
    inlined: dict[str, nn.Module]
    front_end: str = "symbolic"


@dataclasses.dataclass
class TraceReport:
    """What was traced as a whole and what was kept as Python code."""

    traced: list[str] = dataclasses.field(default_factory=list)  # module paths ("" = the root)
    untraced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (path, type, reason)
    parts: list[Part] = dataclasses.field(default_factory=list, repr=False)
    # (path, type, mode, reason): traced in its own mode only, the other mode's forward failed to trace
    one_mode: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)

    @property
    def whole(self) -> bool:
        return self.traced == [""]

    def __str__(self) -> str:
        if self.whole:
            return "traced as a whole"
        lines = [f"traced {len(self.traced)} part(s): " + ", ".join(p or "<root>" for p in self.traced)]
        lines += [f"kept as Python code: {p or '<root>'} ({t}): {r}" for p, t, r in self.untraced]
        return "\n".join(lines)


def capture_tree(
    module: nn.Module,
    config: TransformConfig,
    leaf_modules=(),
    *,
    partial: bool = True,
    path: str = "",
    report: TraceReport | None = None,
    patterns: dict[str, frozenset[str]] | None = None,
    opened: bool = False,
    hooked: Callable[[str, nn.Module], bool] | None = None,
) -> tuple[nn.Module, TraceReport]:
    """Capture ``module`` (already a private copy) as described in the module docstring."""
    report = report if report is not None else TraceReport()
    hooked = hooked if hooked is not None else hooked_classes(module)
    if path and (type(module) in STANDARD_TYPES or not _holds_kernels(module)):
        # A lone conv/linear reached from Python code: a graph of it would hold its coefficients as a child
        # named "weight" where callers read a tensor. It stays a module; its weight gets the parametrized
        # coefficient form (ipfx.form.parametrize), read as a tensor like before. A module without any kernel
        # (an activation, a norm, a pooling block) has nothing to rewrite: it stays as it is.
        return module, report
    if opened or (partial and hooked(path, module)):
        report.untraced.append((path, type(module).__name__, OPENED if opened else HOOKED))
        _capture_children(module, config, leaf_modules, partial, path, report, patterns, hooked)
        return module, report
    user_leaves = [m for m in leaf_modules if not isinstance(m, str)] + [
        m[len(path) + 1 :] if path and m.startswith(path + ".") else m
        for m in leaf_modules if isinstance(m, str) and (not path or m.startswith(path + "."))
    ]
    hooked_leaves = [name for name, m in module.named_modules() if name and hooked(_join(path, name), m)] \
        if partial else []
    auto_leaves: list[str] = []
    while True:
        try:
            pattern = pattern_for(module, None if patterns is None else patterns.get(path))
            traced, inlined, one_mode = trace_modes(module, config, user_leaves + hooked_leaves + auto_leaves,
                                                    name_prefix=_prefix(path), pattern=pattern)
            break
        except TraceError as exc:
            failed = getattr(exc, "module_path", "")
            if not partial:
                raise
            if not failed or failed in auto_leaves:
                reason = first_line(exc.__cause__ or exc, 200)
                report.untraced.append((path, type(module).__name__, reason))
                _capture_children(module, config, leaf_modules, partial, path, report, patterns, hooked)
                return module, report
            auto_leaves.append(failed)
    if one_mode is not None:
        mode = "train" if module.training else "eval"
        report.one_mode.append((path, type(module).__name__, mode, one_mode))
    report.traced.append(path)
    report.parts.append(Part(path, traced, inlined))
    gm = traced.graph_module(module.training) if isinstance(traced, ModeSwitch) else traced
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    for node in [n for g in graphs_of(traced) for n in g.graph.nodes]:
        if node.op != "call_module":
            continue
        leaf = node.target
        child = gm.get_submodule(leaf)
        user_leaf = leaf in user_leaves or bool(leaf_types and isinstance(child, leaf_types))
        if leaf not in auto_leaves and leaf not in hooked_leaves and not (user_leaf and partial):
            continue  # an ordinary torch.nn leaf (batch norm, pooling, ...), or partial tracing is off
        parent_path, _, name = leaf.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        if getattr(parent, name) is not child:
            continue  # already replaced (the module is called more than once)
        new, _ = capture_tree(child, config, leaf_modules, partial=partial, path=_join(path, leaf), report=report,
                              patterns=patterns, hooked=hooked)
        keep_source(new, child)
        setattr(parent, name, new)
    return traced, report


def _capture_children(module: nn.Module, config: TransformConfig, leaf_modules, partial: bool, path: str,
                      report: TraceReport, patterns, hooked) -> None:
    """Capture each child of ``module``, kept as Python code, in place. A child ``nn.Sequential`` is opened
    (its own children captured, it kept): Python code may iterate or index it and call its entries itself
    (ultralytics: ``for m in self.model: x = m(x)``), which a graph of the whole would not answer."""
    for name, child in list(module.named_children()):
        new, _ = capture_tree(child, config, leaf_modules, partial=partial, path=_join(path, name), report=report,
                              patterns=patterns, opened=isinstance(child, nn.Sequential), hooked=hooked)
        keep_source(new, child)
        setattr(module, name, new)


def _holds_kernels(module: nn.Module) -> bool:
    """Whether ``module`` holds a convolution, linear or attention layer (whose weights a trace exposes)."""
    return any(own_type(m) in STANDARD_TYPES or isinstance(m, nn.MultiheadAttention) for m in module.modules())


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _prefix(path: str) -> str:
    return f"{path}." if path else ""
