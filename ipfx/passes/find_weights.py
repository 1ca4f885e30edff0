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

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..attention import KERNEL_POSITIONS, is_attention_call

# target -> (kind, spatial dims); the weight is args[1] or kwargs["weight"] for all of them.
KERNEL_FUNCTIONS: dict[object, tuple[str, int]] = {
    torch.conv1d: ("conv", 1),
    torch.conv2d: ("conv", 2),
    torch.conv3d: ("conv", 3),
    torch.conv_transpose1d: ("conv_transpose", 1),
    torch.conv_transpose2d: ("conv_transpose", 2),
    torch.conv_transpose3d: ("conv_transpose", 3),
    F.conv1d: ("conv", 1),
    F.conv2d: ("conv", 2),
    F.conv3d: ("conv", 3),
    F.conv_transpose1d: ("conv_transpose", 1),
    F.conv_transpose2d: ("conv_transpose", 2),
    F.conv_transpose3d: ("conv_transpose", 3),
    F.linear: ("linear", 0),
    torch._C._nn.linear: ("linear", 0),
}


def _wrapped_linear_kernels() -> dict[object, tuple[int, ...]]:
    """Leaf functions (``torch.fx.wrap``) that take linear weights as arguments: target -> positions.

    torchvision's shifted-window attention (Swin, Swin3D) is one call in the graph receiving the ``qkv``
    and ``proj`` weights; each is an ``(out, in)`` matrix used by ``F.linear`` inside, so it is a linear
    kernel like any other.
    """
    table: dict[object, tuple[int, ...]] = {}
    try:
        from torchvision.models import swin_transformer
        from torchvision.models.video import swin_transformer as swin3d
    except ImportError:  # torchvision is optional for this table
        return table
    table[swin_transformer.shifted_window_attention] = (1, 2)
    table[swin3d.shifted_window_attention_3d] = (1, 2)
    return table


WRAPPED_LINEAR_KERNELS = _wrapped_linear_kernels()


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


def weight_argument(node: fx.Node):
    """The ``weight`` argument of a conv/linear call node (a Node, a constant or None)."""
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("weight")


_PARAMETERS = {
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "linear": ("input", "weight", "bias"),
}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def kernel_call_arguments(node: fx.Node) -> dict | None:
    """The arguments of a conv/linear call by name, defaults filled in; None if they do not fit."""
    kind, _ = kernel_call_info(node)
    names = _PARAMETERS[kind]
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return None
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if "input" not in args or "weight" not in args:
        return None
    for name in names[2:]:
        args.setdefault(name, _DEFAULTS[name])
    return args


def is_kernel_call(node: fx.Node) -> bool:
    return node.op == "call_function" and _target_in(node.target)


def kernel_call_info(node: fx.Node) -> tuple[str, int]:
    return KERNEL_FUNCTIONS[node.target]


def find_kernel_sites(gm: fx.GraphModule) -> list[KernelSite]:
    """Every parameter of ``gm`` used as a conv/linear kernel, in graph order of first use."""
    sites: dict[str, KernelSite] = {}
    getattrs = _parameter_getattrs(gm)
    for node in gm.graph.nodes:
        for kind, dims, weight in _kernel_arguments(gm, node):
            _collect(sites, getattrs, node, kind, dims, weight)
    # A parameter used as kernels of calls of different kinds/ranks has no single kernel layout.
    return [s for s in sites.values() if len({(u.kind, u.dims) for u in s.uses}) == 1]


def _kernel_arguments(gm: fx.GraphModule, node: fx.Node):
    """(kind, dims, weight argument) for each kernel a call node takes."""
    if is_kernel_call(node):
        kind, dims = kernel_call_info(node)
        yield kind, dims, weight_argument(node)
    elif is_attention_call(gm, node):  # nn.MultiheadAttention's projections (see ipfx.attention)
        for position in KERNEL_POSITIONS:
            if position < len(node.args):
                yield "linear", 0, node.args[position]
    elif node.op == "call_function" and _hashable_in(node.target, WRAPPED_LINEAR_KERNELS):
        for position in WRAPPED_LINEAR_KERNELS[node.target]:
            if position < len(node.args):
                yield "linear", 0, node.args[position]


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


def _target_in(target) -> bool:
    return _hashable_in(target, KERNEL_FUNCTIONS)


def _hashable_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:  # unhashable target
        return False
