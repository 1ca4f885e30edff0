"""The pass manager and the one contract every pass keeps.

A pass changes the object its pipeline threads through (a captured model in :func:`ipfx.transform`, the
model in :func:`ipfx.lower`) in place and returns a :class:`PassResult`: what it changed and what it left
alone, and why. A pass never runs another pass, never lints, recompiles or warns: the manager

* runs the passes in order, each between its precondition (``requires``) and postcondition (``ensures``);
* hands a :class:`GraphPass` every graph of the object in turn, as a :class:`GraphSite` (a
  :class:`~ipfx.capture.modes.ModeSwitch`'s two graphs as one combined graph, so a weight used in both
  modes is treated once, then split back), and lints and recompiles each graph the pass changed;
* keeps every result (:attr:`PassManager.results`); the API turns what was skipped into one warning.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch.fx as fx
import torch.nn as nn

from ..capture.modes import ModeSwitch


@dataclasses.dataclass
class PassResult:
    """What one pass did: the names it changed (weight prefixes, module paths) and those it left alone,
    each with the reason."""

    changed: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.changed)

    def add(self, other: "PassResult") -> None:
        self.changed += other.changed
        self.skipped.update(other.skipped)


@dataclasses.dataclass
class GraphSite:
    """One graph a :class:`GraphPass` works on, and where it sits in the model."""

    gm: fx.GraphModule  # a ModeSwitch's combined graph (both modes) where the part is one
    path: str = ""  # the captured part's path in the model ("" for the model itself)
    owners: dict[str, nn.Module] = dataclasses.field(default_factory=dict)  # original modules below path
    inlined: dict[str, nn.Module] = dataclasses.field(default_factory=dict)  # standard modules traced through
    front_end: str = ""  # "export" or "symbolic"

    @property
    def name_prefix(self) -> str:
        """What names in this graph are prefixed with to be names in the model."""
        return f"{self.path}." if self.path else ""


class Pass:
    """One named step over the threaded object; subclasses implement :meth:`run`."""

    name: str = ""

    def requires(self, obj: Any) -> None:  # noqa: B027 - optional precondition
        """Raise if ``obj`` is not what this pass can work on."""

    def run(self, obj: Any) -> PassResult:
        raise NotImplementedError

    def ensures(self, obj: Any) -> None:  # noqa: B027 - optional postcondition
        """Raise if the pass left ``obj`` in a state it promised not to."""

    def __repr__(self) -> str:
        return self.name or type(self).__name__


class GraphPass(Pass):
    """A pass over one graph at a time (module docstring); subclasses implement :meth:`run_graph`."""

    def run_graph(self, site: GraphSite) -> PassResult:
        raise NotImplementedError


#: The graphs of the threaded object: (graph module or ModeSwitch, GraphSite fields other than gm).
Sites = Callable[[Any], Sequence[tuple[fx.GraphModule | ModeSwitch, dict]]]


@dataclasses.dataclass
class PassManager:
    """Run ``passes`` in order (module docstring); ``sites`` gives the graphs a :class:`GraphPass` runs on,
    asked again before each such pass (an earlier pass may have changed them)."""

    passes: Sequence[Pass]
    sites: Sites | None = None
    results: list[tuple[str, PassResult]] = dataclasses.field(default_factory=list)

    def __call__(self, obj: Any) -> Any:
        self.results = []
        for p in self.passes:
            p.requires(obj)
            result = self._run_graphs(p, obj) if isinstance(p, GraphPass) else p.run(obj)
            p.ensures(obj)
            self.results.append((p.name or type(p).__name__, result))
        return obj

    def _run_graphs(self, p: GraphPass, obj: Any) -> PassResult:
        if self.sites is None:
            raise TypeError(f"{p!r} works on graphs: give the PassManager sites=... to find them")
        total = PassResult()
        for holder, where in self.sites(obj):
            gm = holder.combine() if isinstance(holder, ModeSwitch) else holder
            result = p.run_graph(GraphSite(gm, **where))
            if result.modified:
                gm.graph.lint()
                if isinstance(holder, ModeSwitch):
                    holder.split(gm)  # each mode's graph module recompiles as its graph is set
                else:
                    gm.recompile()
            total.add(result)
        return total

    def result(self, name: str) -> PassResult | None:
        return next((r for n, r in self.results if n == name), None)

    def skipped(self) -> dict[str, str]:
        """Everything any pass left alone, with the reason."""
        found: dict[str, str] = {}
        for _, result in self.results:
            found.update(result.skipped)
        return found
