"""Pass: give every guarded graph its fallback, the original module, reading the graph's coefficients.

A symbolically traced graph assumes one pattern of optional arguments (:mod:`ipfx.capture.guards`); a call
with another runs the module's own forward instead. That forward is the original module object (the
private copy's, as it was before capture): for it to compute what the graph computes, every weight the
graph holds as coefficients must read as those same coefficients there too. So each original owner
module of a rewritten ``<prefix>.weight`` gets the parametrized form sharing the graph's
:class:`~ipfx.form.reparam.BasisWeight` tensors (:func:`ipfx.form.parametrize.parametrize_weight`): one
``coeff``/``mask``/``basis``, read by either path, trained by either. The fallback is kept outside the
module tree (``meta``, so it has no state-dict entries of its own). Where a rewritten weight is not a module's ``weight``
(a raw ``self.w``, weight norm's direction ``parametrizations.weight.original1``), its owner is
converted for that parameter name (reading ``self.w`` composes it); an owner with two such kernels
cannot be, so that part gets no fallback and a non-matching call raises.

With ``check_first_calls`` (a model transformed without example inputs) every traced graph gets its
fallback, guarded or not, and is marked to be checked against it on the first call of each kind
(:mod:`ipfx.capture.first_call`): a graph traced down a path the real input does not take is caught there.
"""

from __future__ import annotations

import torch.nn as nn

from ..capture.first_call import CHECK
from ..capture.guards import FALLBACK, PATTERN, sign
from ..capture.replaced import record_shared
from ..capture.modes import graphs_of
from ..form.parametrize import is_parametrized, parametrize_tied, parametrize_weight, weight_holders
from ..form.reparam import BasisWeight
from .manager import Pass, PassResult


class GuardFallbacks(Pass):
    name = "guard fallbacks"

    def __init__(self, check_first_calls: bool = False) -> None:
        self.check_first_calls = check_first_calls

    def run(self, captured) -> PassResult:
        guarded = [(part, gm) for part in captured.parts for gm in graphs_of(part.holder)
                   if PATTERN in gm.meta or (self.check_first_calls and part.front_end == "symbolic")]
        if not guarded:
            return PassResult()
        forms: dict[str, BasisWeight] = {}  # original owner path -> the graph's coefficient weight
        raw = set()  # parts holding a rewritten parameter that is not a module's "weight"
        paths = [p.path for p in captured.parts]
        for part in captured.parts:
            nested = [p for p in paths if p != part.path and (not part.path or p.startswith(part.path + "."))]
            for gm in graphs_of(part.holder):
                for name, m in gm.named_modules():
                    where = _join(part.path, name)
                    if any(where == p or where.startswith(p + ".") for p in nested):
                        continue  # a part captured inside this one: its weights are named relative to it
                    if isinstance(m, BasisWeight) and not is_parametrized(m):
                        owner, _, attr = m.weight_name.rpartition(".")
                        forms[_join(part.path, owner), attr] = (part.path, m)
        holders = weight_holders(captured.original.values())
        for (path, attr), (part_path, form) in forms.items():
            original = captured.original.get(path)
            weight = None if original is None else original._parameters.get(attr)
            if original is form or not isinstance(weight, nn.Parameter) or tuple(weight.shape) != form.weight_shape:
                continue
            if attr == "weight":
                parametrize_tied(holders, weight, form)  # tied modules read one set of coefficients
            elif is_parametrized(original):  # a second raw kernel of one module: no fallback can read both
                raw.add(part_path)
            else:  # a raw kernel (self.w), or weight norm's direction (parametrizations.weight.original1)
                parametrize_weight(original, form, attr)
        result = PassResult()
        for part, gm in guarded:
            if any(not part.path or p == part.path or p.startswith(part.path + ".") for p in raw):
                result.skipped[part.path or "<model>"] = (
                    "a module in it holds two or more raw kernels, which its own forward cannot read as "
                    "coefficients, so the graph has no fallback: a call of another pattern of optional "
                    "arguments raises, and without example inputs its first calls are not checked")
                continue
            # in meta, not an attribute: no child module, no state-dict entries; meta is copied with the graph
            gm.meta[FALLBACK] = captured.original[part.path]
            record_shared(gm, gm.meta[FALLBACK])  # (a module replaced later is told: ipfx.capture.replaced)
            sign(gm)  # the graph reports the forward's own signature, optional arguments included
            if self.check_first_calls and part.front_end == "symbolic":
                gm.meta[CHECK] = set()
            result.changed.append(part.path or "<model>")
        return result


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name
