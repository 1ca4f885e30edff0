"""Capture a model as graphs, by one of two front ends, and check what was captured: :func:`capture`.

* ``export``: :func:`ipfx.capture.export.export_modes` (torch.export, non-strict, both training modes): one
  ATen-level graph for the whole model. Needs example inputs.
* ``symbolic``: :func:`ipfx.capture.partial.capture_tree` (torch.fx symbolic tracing, both modes; the largest
  traceable parts when the model does not trace as a whole). Needs no inputs.

``capture="auto"`` uses export when example inputs are given and falls back to symbolic tracing when
export fails or its graph does not reproduce the model; the :class:`Captured` result says which front
end captured each part, and why a fallback happened.

:class:`CheckCapture` (with example inputs): the captured graphs must reproduce the model's outputs in
train and in eval mode, on the example inputs and on inputs of another shape the graphs admit, before
anything is rewritten (:mod:`ipfx.capture.verify`). An exported graph keeps torch.export's shape guards
(:mod:`ipfx.capture.shape_guards`), so a shape it was not captured for is refused, not computed wrongly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch.fx as fx
import torch.nn as nn

from . import verify
from ..config import TransformConfig
from ..errors import TraceError, first_line
from .export import export_modes
from .guards import record_patterns
from .partial import Part, TraceReport, capture_tree
from .shape_guards import is_guard_failure
from .shapes import batch_of_two, one_more_sample, other_shapes, size_one_inputs
from .source_attributes import keep_containers, set_submodule

FRONT_ENDS = ("auto", "export", "symbolic")


@dataclasses.dataclass
class Captured:
    """A model being transformed: its module tree with captured parts, and how they were captured."""

    model: nn.Module  # the result tree (a GraphModule / ModeSwitch, or the model holding captured parts)
    parts: list[Part]
    report: TraceReport
    original: dict[str, nn.Module]  # the private copy's modules by every path, as they were before capture
    front_end: str  # "export" or "symbolic"
    fallback: str | None = None  # why capture="auto" did not use export
    fixed: str | None = None  # why torch.export fixed some sizes (the graph refuses other values of them)
    checked: list[str] = dataclasses.field(default_factory=list)  # the calls the capture check compared
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should be told

    def owners(self, path: str) -> dict[str, nn.Module]:
        """The original modules below ``path``, by path relative to it (for the config's type filter)."""
        if not path:
            return dict(self.original)
        head = path + "."
        return {"": self.original[path], **{k[len(head):]: v for k, v in self.original.items() if k.startswith(head)}}


def capture(model: nn.Module, front_end: str, config: TransformConfig, args: tuple | None = None,
            kwargs: dict | None = None, **options) -> Captured:
    """``model`` (a private copy, changed in place) as graphs, by ``front_end`` (``"auto"``, ``"export"``
    or ``"symbolic"``), checked against ``options["reference"]`` on the example where one is given; the
    one entry point of this package (module docstring). ``options``: those of :class:`Capture`."""
    return Capture(front_end, config, args, kwargs or {}, **options).run(model)


@dataclasses.dataclass
class Capture:
    """What to capture and how; :meth:`run` does it (module docstring)."""

    front_end: str
    config: TransformConfig
    args: tuple | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)
    leaf_modules: Sequence[Any] = ()
    partial: bool = True
    reference: nn.Module | None = None  # what the check compares with (the user's model, untouched)
    given_graph: bool = False  # the model is already an exported graph (from an ExportedProgram)
    dynamic_shapes: Any = None  # torch.export's spec, from the user; None: every size free where possible

    def run(self, model: nn.Module) -> Captured:
        original = dict(model.named_modules(remove_duplicate=False))  # a module held twice: under both paths
        fallback = None
        if self.given_graph:
            report = TraceReport(traced=[""], parts=[Part("", model, {}, "export")])
            return Captured(model, report.parts, report, original, "export")
        if self.front_end in ("auto", "export") and self.args is not None:
            try:
                holder, fixed, check = self._export(model)
                report = TraceReport(traced=[""], parts=[Part("", holder, {}, "export")])
                return Captured(holder, report.parts, report, original, "export", fixed=fixed,
                                checked=check.checked, notes=check.notes)
            except TraceError as exc:
                if self.front_end == "export":
                    raise
                fallback = str(exc)
        patterns = None
        if self.args is not None:  # trace each forward with the optional arguments it is called with
            reference = self.reference if self.reference is not None else model
            patterns = record_patterns(reference, lambda: verify.run(reference, self.args, self.kwargs, False))
        result, report = capture_tree(model, self.config, self.leaf_modules, partial=self.partial, patterns=patterns)
        hold_unreached(result, report.parts, original, self.config.module_types)
        check = None
        if self.args is not None and self.reference is not None:
            check = CheckCapture(self.reference, self.args, self.kwargs)
            try:
                check.check(result)
            except TraceError as exc:
                raise TraceError(f"{exc}" + (f" (torch.export failed first: {fallback})" if fallback else "")) from exc
        return Captured(result, report.parts, report, original, "symbolic", fallback,
                        checked=check.checked if check else [], notes=check.notes if check else [])

    def _export(self, model: nn.Module) -> tuple[nn.Module, str | None, "CheckCapture"]:
        """Export and check: on two samples where the example holds one (torch.export fixes a size-1
        batch, and train-mode batch norm cannot run on it), else, or when that graph fails the check
        (it may not admit one sample), on the example as given. Returns the graphs, why sizes are fixed
        (if they are), and the check that passed."""
        two = batch_of_two(self.args, self.kwargs) if self.dynamic_shapes is None else None
        attempts = ([two] if two is not None else []) + [(self.args, self.kwargs)]
        refused = None  # why the graph exported on two samples failed
        for i, inputs in enumerate(attempts):
            try:
                holder, fixed = export_modes(model, *inputs, self.dynamic_shapes)
                check = CheckCapture(model, self.args, self.kwargs, export_inputs=inputs)
                check.check(holder)
            except TraceError as exc:
                if i == len(attempts) - 1:
                    raise
                refused = first_line(exc)
                continue
            if refused is not None:  # exported on the one sample: torch.export fixes a size-1 batch
                fixed = "; ".join(filter(None, (
                    "the batch is fixed to the example's 1, as torch.export fixes a size of 1: the graph exported "
                    f"on two samples failed on the one-sample example ({refused}); give example inputs of the "
                    "batch size the model will run at", fixed)))
            return holder, fixed, check


@dataclasses.dataclass
class CheckCapture:
    """The captured model reproduces ``reference`` in both modes, on the example inputs and on inputs of
    another shape, or raises :class:`TraceError` naming the innermost module whose graph differs.

    Calls compared: the example in eval and train mode (train mode on two samples built from it where the
    model cannot run train mode on the example, a batch of one before a batch norm: a note says so); then
    the first inputs of another shape (:func:`ipfx.capture.shapes.other_shapes` for an exported graph, one more
    sample for a traced one) that both the model and the graph's guards accept, in both modes; then each free
    size at 1 (:func:`ipfx.capture.shapes.size_one_inputs`; a traced graph: one sample), where the model and the
    guards accept it: torch.export assumes a free size is never 1 and the guards admit 1 as torch does, so a
    branch the model takes at size 1 only (``if x.shape[0] == 1``, ``if x.shape[-1] == 1``) was left out of the
    graph unseen. A graph that raises where the model
    computes, computes something else, or leaves the buffers otherwise, fails the check.
    """

    reference: nn.Module
    args: tuple
    kwargs: dict
    export_inputs: tuple[tuple, dict] | None = None  # what an exported graph was exported on
    checked: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def check(self, captured: nn.Module) -> None:
        self.checked, self.notes = [], []
        self._compare(captured, self.args, self.kwargs, False, "the example inputs")
        train_inputs = (self.args, self.kwargs)
        failure = _fails(self.reference, self.args, self.kwargs, True)
        if failure is not None:
            two = batch_of_two(self.args, self.kwargs)
            if two is None or _fails(self.reference, *two, True) is not None:
                self.notes.append(f"{type(self.reference).__name__} cannot run in train mode on the example inputs "
                                  f"({failure}): train mode was captured but not checked; give example inputs it "
                                  "can run on in train mode to check it")
                train_inputs = None
            else:
                train_inputs = two
            if train_inputs is not None:
                self.notes.append(f"{type(self.reference).__name__} cannot run in train mode on the one-sample "
                                  f"example ({failure}); its train mode was captured and checked on two samples "
                                  "built by repeating the example")
        if train_inputs is not None:
            self._compare(captured, *train_inputs, True, "the example inputs" if failure is None else "two samples")
        for args, kwargs, what in self._other_shapes(captured):
            if self._check_other(captured, args, kwargs, f"inputs of another shape ({what})"):
                break
        graph = captured.graph_module(False) if hasattr(captured, "graph_module") else captured
        exported = self.export_inputs is not None and isinstance(graph, fx.GraphModule)
        for args, kwargs, what in size_one_inputs(graph if exported else None, *(
                self.export_inputs if exported else (self.args, self.kwargs))):
            self._check_other(captured, args, kwargs, what)

    def _check_other(self, captured: nn.Module, args: tuple, kwargs: dict, what: str) -> bool:
        """Compare on inputs of another shape, in eval mode and, where the model runs it there, in train mode;
        False, comparing nothing, where the model or the graph's guards refuse them."""
        try:
            expected = verify.run(self.reference, args, kwargs, False, with_state=True)
        except Exception:  # noqa: BLE001 - the model itself refuses this shape
            return False
        try:
            actual = self._run_captured(captured, args, kwargs, False)
        except Exception as exc:  # noqa: BLE001 - a guard refusing it is fine; anything else fails the check
            if is_guard_failure(exc):
                return False
            raise self._failed(exc, False, what) from exc
        self._judge(captured, args, kwargs, False, what, actual, expected)
        if _fails(self.reference, args, kwargs, True) is None:
            self._compare(captured, args, kwargs, True, what)
        return True

    def _other_shapes(self, captured: nn.Module):
        graph = captured.graph_module(False) if hasattr(captured, "graph_module") else captured
        if self.export_inputs is not None and isinstance(graph, fx.GraphModule):
            yield from other_shapes(graph, *self.export_inputs)
        else:
            one_more = one_more_sample(self.args, self.kwargs)
            if one_more is not None:
                yield (*one_more, "one more sample")

    def _compare(self, captured: nn.Module, args: tuple, kwargs: dict, training: bool, what: str) -> None:
        expected = verify.run(self.reference, args, kwargs, training, with_state=True)
        try:
            actual = self._run_captured(captured, args, kwargs, training)
        except Exception as exc:  # noqa: BLE001 - the model ran on these inputs, so the graph must too
            raise self._failed(exc, training, what) from exc
        self._judge(captured, args, kwargs, training, what, actual, expected)

    def _run_captured(self, captured: nn.Module, args: tuple, kwargs: dict, training: bool):
        """The captured model's call, with its state (:func:`verify.run`); an exported graph shares the tensors
        of the model it was exported from (``reference``), whose modules say which parameters a call changes in
        place (an embedding with max_norm: the graph renormalised the shared rows, for good)."""
        shares = self.reference if self.export_inputs is not None else None
        return verify.run(captured, args, kwargs, training, state_of=shares, with_state=True)

    def _failed(self, exc: BaseException, training: bool, what: str) -> TraceError:
        return TraceError(f"the captured graph of {type(self.reference).__name__} fails in "
                          f"{'train' if training else 'eval'} mode on {what}, where the model runs ({first_line(exc)}). "
                          "Capture it with the other front end (capture='symbolic' or 'export'), or report the model")

    def _judge(self, captured: nn.Module, args: tuple, kwargs: dict, training: bool, what: str, actual, expected) -> None:
        """``actual``, ``expected``: (output, buffers before, buffers after) of the graph's and the model's call
        (:func:`verify.run` ``with_state``): the outputs must agree, and so must every buffer either call set or
        changed (a graph that leaves out an update loses the model's state)."""
        mode = "train" if training else "eval"
        (actual, actual_before, actual_after), (expected, expected_before, expected_after) = actual, expected
        problem = verify.difference(actual, expected)
        state = None if problem is not None else verify.state_difference(
            actual_after, expected_after, actual_before, expected_before)
        if state is not None:
            raise TraceError(
                f"the captured graph of {type(self.reference).__name__} does not leave the model's buffers as the "
                f"model does in {mode} mode on {what} ({state})"
                + ("; a buffer registered as None and set by the forward cannot be captured as a graph: register "
                   "it as a tensor (torch.zeros(...))" if verify.UNSET in state else "")
                + ". Capture it with the other front end (capture='symbolic' or 'export'), or report the model")
        if problem is not None:
            where = verify.localise(self.reference, captured, args, kwargs, training)
            raise TraceError(
                f"the captured graph of {type(self.reference).__name__} does not reproduce the model in {mode} "
                f"mode on {what} ({problem})" + (f"; the first module that differs is {where}" if where else "")
                + ". Capture it with the other front end (capture='symbolic' or 'export'), or report the model")
        self.checked.append(f"{mode}: {what} {verify.shapes(args, kwargs)}")


def hold_unreached(model: nn.Module, parts: list[Part], original: dict[str, nn.Module], types: tuple) -> list[str]:
    """Put into each traced part the conv/linear modules its graph does not use, at their own paths.

    A symbolic graph holds only what its trace touched: a convolution used only when an optional argument
    is given, or only on a branch the trace did not take, is not in it, so its weight would be neither in
    the result's state dict nor in coefficient form, while the part's fallback (its original module,
    :mod:`ipfx.capture.guards`, :mod:`ipfx.capture.first_call`) still calls it. Held by the graph module, the module is
    converted like every other unreached weight (:class:`~.parametrize_unreached.ParametrizeUnreached`),
    and the fallback, which holds the same module object, reads those coefficients. Returns the paths added.
    """
    present = {id(p) for p in model.parameters()}
    symbolic = sorted((p for p in parts if p.front_end == "symbolic"), key=lambda p: -len(p.path))
    added, touched = [], {}
    for path, module in original.items():
        weight = module._parameters.get("weight")
        if not path or not isinstance(module, types) or not isinstance(weight, nn.Parameter) or id(weight) in present:
            continue
        part = next((p for p in symbolic if not p.path or path.startswith(p.path + ".")), None)
        if part is None:
            continue
        relative = path[len(part.path) + 1:] if part.path else path
        holder = part.holder
        try:
            holder.get_submodule(relative)
            continue  # something else stands at that path already
        except AttributeError:
            pass
        set_submodule(holder, relative, module)
        present.update(id(p) for p in module.parameters())
        added.append(path)
        touched[part.path] = part.holder
    for path, holder in touched.items():  # containers created on the way are bare modules: give back their class
        keep_containers(holder, original[path])
    return added


def _fails(model: nn.Module, args: tuple, kwargs: dict, training: bool) -> str | None:
    """Why ``model`` cannot run on these inputs in this mode (None when it can)."""
    try:
        verify.run(model, args, kwargs, training)
    except Exception as exc:  # noqa: BLE001 - any error means: not a call to compare on
        return first_line(exc, 200)
    return None
