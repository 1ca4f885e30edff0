"""Pass: capture a model as graphs, by one of two front ends, and check what was captured.

* ``export``: :func:`ipfx.export.export_modes` (torch.export, non-strict, both training modes): one
  ATen-level graph for the whole model. Needs example inputs.
* ``symbolic``: :func:`ipfx.partial.capture_tree` (torch.fx symbolic tracing, both modes; the largest
  traceable parts when the model does not trace as a whole). Needs no inputs.

``capture="auto"`` uses export when example inputs are given and falls back to symbolic tracing when
export fails or its graph does not reproduce the model; the :class:`Captured` result says which front
end captured each part, and why a fallback happened.

:class:`CheckCapture` (with example inputs): the captured graphs must reproduce the model's outputs on
the example inputs in train and in eval mode before anything is rewritten (:mod:`ipfx.verify`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch.nn as nn

from ..config import TransformConfig
from ..errors import TraceError
from ..export import export_modes
from ..guards import record_patterns
from ..partial import Part, TraceReport, capture_tree
from .. import verify
from .manager import Pass, PassOutcome

FRONT_ENDS = ("auto", "export", "symbolic")


@dataclasses.dataclass
class Captured:
    """A model being transformed: its module tree with captured parts, and how they were captured."""

    model: nn.Module  # the result tree (a GraphModule / ModeSwitch, or the model holding captured parts)
    parts: list[Part]
    report: TraceReport
    original: dict[str, nn.Module]  # the private copy's modules by path, as they were before capture
    front_end: str  # "export" or "symbolic"
    fallback: str | None = None  # why capture="auto" did not use export

    def owners(self, path: str) -> dict[str, nn.Module]:
        """The original modules below ``path``, by path relative to it (for the config's type filter)."""
        if not path:
            return dict(self.original)
        head = path + "."
        return {"": self.original[path], **{k[len(head):]: v for k, v in self.original.items() if k.startswith(head)}}


@dataclasses.dataclass
class Capture(Pass):
    """Module -> :class:`Captured` by the chosen front end (module docstring)."""

    front_end: str
    config: TransformConfig
    args: tuple | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)
    leaf_modules: Sequence[Any] = ()
    partial: bool = True
    reference: nn.Module | None = None  # what the check compares with (the user's model, untouched)
    given_graph: bool = False  # the model is already an exported graph (from an ExportedProgram)
    name: str = "capture"

    def call(self, model: nn.Module) -> PassOutcome:
        original = dict(model.named_modules())
        fallback = None
        if self.given_graph:
            report = TraceReport(traced=[""], parts=[Part("", model, {}, "export")])
            return PassOutcome(Captured(model, report.parts, report, original, "export"), False)
        if self.front_end in ("auto", "export") and self.args is not None:
            try:
                holder = export_modes(model, self.args, self.kwargs)
                CheckCapture(model, self.args, self.kwargs).check(holder)
                report = TraceReport(traced=[""], parts=[Part("", holder, {}, "export")])
                return PassOutcome(Captured(holder, report.parts, report, original, "export"), True)
            except TraceError as exc:
                if self.front_end == "export":
                    raise
                fallback = str(exc)
        patterns = None
        if self.args is not None:  # trace each forward with the optional arguments it is called with
            reference = self.reference if self.reference is not None else model
            patterns = record_patterns(reference, lambda: verify.run(reference, self.args, self.kwargs, False))
        result, report = capture_tree(model, self.config, self.leaf_modules, partial=self.partial, patterns=patterns)
        if self.args is not None and self.reference is not None:
            try:
                CheckCapture(self.reference, self.args, self.kwargs).check(result)
            except TraceError as exc:
                raise TraceError(f"{exc}" + (f" (torch.export failed first: {fallback})" if fallback else "")) from exc
        captured = Captured(result, report.parts, report, original, "symbolic", fallback)
        return PassOutcome(captured, True)


@dataclasses.dataclass
class CheckCapture(Pass):
    """The captured model reproduces ``reference`` on the example inputs, in both modes, or raises
    :class:`TraceError` naming the innermost module whose graph differs."""

    reference: nn.Module
    args: tuple
    kwargs: dict
    name: str = "check capture"

    def check(self, captured: nn.Module) -> None:
        for training in (True, False):
            expected = verify.run(self.reference, self.args, self.kwargs, training)
            actual = verify.run(captured, self.args, self.kwargs, training)
            problem = verify.difference(actual, expected)
            if problem is not None:
                mode = "train" if training else "eval"
                where = verify.localise(self.reference, captured, self.args, self.kwargs, training)
                raise TraceError(
                    f"the captured graph of {type(self.reference).__name__} does not reproduce the model in {mode} "
                    f"mode on the example inputs ({problem})" + (f"; the first module that differs is {where}" if where else "")
                    + ". Capture it with the other front end (capture='symbolic' or 'export'), or report the model")

    def call(self, captured: Captured) -> PassOutcome:
        self.check(captured.model)
        return PassOutcome(captured, False)
