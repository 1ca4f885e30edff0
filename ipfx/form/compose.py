"""The compose algebra, defined once: ``W = reshape((mask * coeff) @ basis, weight_shape)``.

``space="sp"`` fixes ``basis = I`` (docs/design.md) and ``C @ I = C`` exactly, so SP skips the product:
``W = reshape(mask * coeff)``, one elementwise op as in ``torch.nn.utils.prune``. Linear weights and
``K = 1`` kernels have no basis at all (SP form): ``W = mask * coeff``.

:func:`compose_weight` is written with torch functions only (``torch.mul``, ``torch.matmul``,
``torch.reshape``), so the same function serves every form: called on tensors it is the eager weight
(:class:`~ipfx.form.reparam.BasisWeight`, the parametrized form, both lowerings, the pruning scores, the
fused ops' dense rebuild); called
on ``torch.fx`` proxies (:func:`emit_compose`) it records the rewrite pass's subgraph, whose exact chain
:mod:`ipfx.passes.subgraphs` matches again.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx


def compose_weight(coeff, mask, basis, weight_shape: Sequence[int] | None, multiplies_basis: bool):
    """``reshape((mask * coeff) @ basis)`` (``basis`` only read when ``multiplies_basis``); no reshape
    when ``weight_shape`` is None (the SP form's ``coeff`` already has the weight's shape). ``mask=None``:
    ``coeff`` is already masked (the fused ops store the kept coefficients only)."""
    weight = coeff if mask is None else torch.mul(coeff, mask)
    if multiplies_basis:
        weight = torch.matmul(weight, basis)
    if weight_shape is not None:
        weight = torch.reshape(weight, tuple(weight_shape))
    return weight


def emit_compose(graph: fx.Graph, prefix: str, multiplies_basis: bool, has_basis: bool,
                 weight_shape: Sequence[int]) -> fx.Node:
    """Insert the compose subgraph of the weight at ``prefix`` (at the graph's insertion point)."""
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def read(name: str) -> fx.Proxy:
        return fx.Proxy(graph.get_attr(f"{prefix}.{name}"), tracer)

    coeff, mask = read("coeff"), read("mask")
    basis = read("basis") if multiplies_basis else None
    return compose_weight(coeff, mask, basis, weight_shape if has_basis else None, multiplies_basis).node
