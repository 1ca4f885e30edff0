"""A small pass manager, in the spirit of ``torch.fx.passes.infra``: named passes, each with a
precondition (``requires``), the work (``call``) and a postcondition (``ensures``), run in order.

A pass here works on whatever object its pipeline threads through (a module, a captured model), not
only on one ``GraphModule``; it returns a :class:`PassOutcome` saying whether it changed anything and
what (``details``, for reports and tests). The manager composes passes; passes never call each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence


@dataclasses.dataclass
class PassOutcome:
    """What one pass did: the object it returns, whether it changed anything, and what."""

    result: Any
    changed: bool
    details: Any = None


class Pass:
    """One named step of a pipeline; subclasses implement :meth:`call` and may check conditions."""

    name: str = ""

    def requires(self, obj: Any) -> None:  # noqa: B027 - optional precondition
        """Raise if ``obj`` is not what this pass can work on."""

    def call(self, obj: Any) -> PassOutcome:
        raise NotImplementedError

    def ensures(self, obj: Any) -> None:  # noqa: B027 - optional postcondition
        """Raise if the pass left ``obj`` in a state it promised not to."""

    def __call__(self, obj: Any) -> PassOutcome:
        self.requires(obj)
        outcome = self.call(obj)
        self.ensures(outcome.result)
        return outcome

    def __repr__(self) -> str:
        return self.name or type(self).__name__


@dataclasses.dataclass
class PassManager:
    """Run ``passes`` in order; :attr:`log` holds ``(pass name, outcome)`` of the last run."""

    passes: Sequence[Pass]
    log: list = dataclasses.field(default_factory=list)

    def __call__(self, obj: Any) -> Any:
        self.log = []
        for p in self.passes:
            outcome = p(obj)
            self.log.append((p.name or type(p).__name__, outcome))
            obj = outcome.result
        return obj

    def outcome(self, name: str) -> PassOutcome | None:
        return next((o for n, o in self.log if n == name), None)
