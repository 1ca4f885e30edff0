"""Analysis: which parameters of a traced graph are convolution or linear kernels.

A parameter ``P`` is a kernel when it reaches the ``weight`` argument of a convolution or linear call:

* directly: the argument *is* ``get_attr(P)`` (every standard module, every ``F.conv2d(x, self.w)``);
* after processing in ``forward`` (weight standardisation, scaling, ...): ``get_attr(P)`` is an
  ancestor of the argument through function/method calls, and ``P`` has the kernel's rank. When several
  such parameters feed one kernel (``self.weight * self.gain``), the largest one is the kernel.

Kernels computed from inputs (no parameter among their ancestors) are not kernels of the model and are
left alone. Rewriting a processed parameter keeps the module's semantics exactly, because the
rewritten subgraph produces the same tensor the parameter held.
"""

from __future__ import annotations

import dataclasses
import operator

import torch.fx as fx
import torch.nn as nn

from .kernels import kernel_inputs


@dataclasses.dataclass
class KernelUse:
    """One call that uses a parameter as its kernel."""

    node: fx.Node  # the conv / linear call
    kind: str  # "conv", "conv_transpose" or "linear"
    dims: int  # spatial dims (0 for linear)
    direct: bool  # the weight argument is the parameter itself


@dataclasses.dataclass
class KernelSite:
    """A parameter used as a kernel, with every ``get_attr`` that reads it and every use."""

    name: str  # qualified parameter name, e.g. "layer1.0.conv1.weight"
    param: nn.Parameter
    getattrs: list[fx.Node]
    uses: list[KernelUse]

    @property
    def kind(self) -> str:
        return self.uses[0].kind

    @property
    def direct(self) -> bool:
        return all(u.direct for u in self.uses)


def find_kernel_sites(gm: fx.GraphModule) -> list[KernelSite]:
    """Every parameter of ``gm`` used as a conv/linear kernel, in graph order of first use."""
    sites: dict[str, KernelSite] = {}
    getattrs = _parameter_getattrs(gm)
    for node in gm.graph.nodes:
        for kind, dims, weight in kernel_inputs(gm, node):
            _collect(sites, getattrs, node, kind, dims, weight)
    # A parameter used as kernels of calls of different kinds/ranks has no single kernel layout.
    return [s for s in sites.values() if len({(u.kind, u.dims) for u in s.uses}) == 1]


def _collect(sites, getattrs, node, kind, dims, weight) -> None:
    """Record ``node`` as a use of the parameter(s) its ``weight`` argument is made from."""
    if not isinstance(weight, fx.Node):
        return
    rank = 2 if kind == "linear" else dims + 2
    if weight.op == "get_attr" and weight.target in getattrs:
        candidates, direct = [weight.target], True
    else:
        candidates, direct = _processed_kernel(weight, getattrs, rank), False
    for name in candidates:
        param = getattrs[name][0]
        if param.dim() != rank:
            continue
        site = sites.get(name)
        if site is None:
            site = sites[name] = KernelSite(name, param, list(getattrs[name][1]), [])
        site.uses.append(KernelUse(node, kind, dims, direct))


def _parameter_getattrs(gm: fx.GraphModule) -> dict[str, tuple[nn.Parameter, list[fx.Node]]]:
    found: dict[str, tuple[nn.Parameter, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            value = operator.attrgetter(node.target)(gm)
        except AttributeError:
            continue
        if isinstance(value, nn.Parameter):
            found.setdefault(node.target, (value, []))[1].append(node)
    return found


def _processed_kernel(weight: fx.Node, getattrs, rank: int) -> list[str]:
    """Parameters of the kernel's rank among ``weight``'s ancestors; the largest if several."""
    seen, stack, found = set(), [weight], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            if node.target in getattrs and getattrs[node.target][0].dim() == rank:
                found.append(node.target)
            continue
        if node.op in ("call_function", "call_method"):
            stack.extend(node.all_input_nodes)
    if not found:
        return []
    largest = max(getattrs[n][0].numel() for n in found)
    return [n for n in found if getattrs[n][0].numel() == largest]
