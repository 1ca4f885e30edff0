"""The one normaliser of kernel calls: which graph nodes are convolutions or linear layers, and their arguments.

Both capture front ends produce graphs whose kernels are ``call_function`` nodes, in different dialects:
symbolic tracing records torch functions (``torch.conv2d``, ``F.linear``, ...), torch.export records ATen
ops (``aten.conv2d.default``, ``aten.linear.default``, ``aten.convolution.default`` after decompositions,
``aten.addmm`` over a transposed weight, ...). Every pass asks :func:`kernel_call` and gets one
:class:`KernelCall` (kind, spatial dims, input, weight, bias, geometry) whichever dialect the node is in.

What a call means is data, not code: one :class:`Schema` per target, in a table per dialect
(:data:`TORCH_KERNELS`, :data:`ATEN_KERNELS`). Calls that take linear kernels among other arguments
(torchvision's Swin attention, ``nn.MultiheadAttention`` recorded by :mod:`ipfx.capture.attention`) are entries of
:data:`LINEAR_KERNEL_CALLS` / :data:`LINEAR_KERNEL_MODULES`: their weights are kernels for the rewrite, but
they are not convolutions a lowering could fuse. Model-specific knowledge belongs in these tables.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_LINEAR = ("input", "weight", "bias")
#: names each kind's normalised arguments have, in this order
ARGUMENTS = {"conv": _CONV, "conv_transpose": _CONV_T[:5] + ("dilation", "groups", "output_padding"),
             "linear": _LINEAR}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


@dataclasses.dataclass(frozen=True)
class Schema:
    """How to read one kernel target's arguments.

    ``kind`` is ``"conv"``, ``"conv_transpose"``, ``"linear"``, or ``"convolution"`` (ATen's generic op,
    whose ``transposed`` argument decides); ``dims`` the spatial dims (``None``: the length of ``stride``);
    ``names`` the positional parameter names. ``weight_transposed``: the weight argument is ``W.T``
    (``addmm``/``mm``), so only processed uses of a parameter reach it.
    """

    kind: str
    dims: int | None
    names: tuple[str, ...]
    weight_transposed: bool = False


def _torch_table() -> dict:
    table = {}
    for d in (1, 2, 3):
        for fn in (getattr(torch, f"conv{d}d"), getattr(F, f"conv{d}d")):
            table[fn] = Schema("conv", d, _CONV)
        for fn in (getattr(torch, f"conv_transpose{d}d"), getattr(F, f"conv_transpose{d}d")):
            table[fn] = Schema("conv_transpose", d, _CONV_T)
    table[F.linear] = table[torch._C._nn.linear] = Schema("linear", 0, _LINEAR)
    return table


def _aten_table() -> dict:
    table = {}
    for d in (1, 2, 3):
        table[getattr(aten, f"conv{d}d").default] = Schema("conv", d, _CONV)
        table[getattr(aten, f"conv{d}d").padding] = Schema("conv", d, _CONV)  # padding="same"/"valid"
        for overload in getattr(aten, f"conv_transpose{d}d").overloads():  # "input" (1-d: "default")
            table[getattr(getattr(aten, f"conv_transpose{d}d"), overload)] = Schema("conv_transpose", d, _CONV_T)
    table[aten.convolution.default] = Schema("convolution", None, _CONVOLUTION)
    table[aten.linear.default] = Schema("linear", 0, _LINEAR)
    # core ATen (after run_decompositions): linear is addmm(bias, x, W.T) or mm(x, W.T)
    table[aten.addmm.default] = Schema("linear", 0, ("bias", "input", "weight"), weight_transposed=True)
    table[aten.mm.default] = Schema("linear", 0, ("input", "weight"), weight_transposed=True)
    return table


#: torch functions, as symbolic tracing records them
TORCH_KERNELS: dict[object, Schema] = _torch_table()
#: ATen ops, as torch.export records them
ATEN_KERNELS: dict[object, Schema] = _aten_table()


#: Leaf functions (``torch.fx.wrap``) that take linear weights as arguments, by qualified name: positions.
#: torchvision's shifted-window attention (Swin, Swin3D) is one call in a symbolic trace receiving the
#: ``qkv`` and ``proj`` weights; each is an ``(out, in)`` matrix used by ``F.linear`` inside. Keyed by name,
#: so that ``import ipfx`` does not import ``torchvision.models`` (about 1.5 s) to build the table.
LINEAR_KERNEL_CALLS: dict[str, tuple[int, ...]] = {
    "torchvision.models.swin_transformer.shifted_window_attention": (1, 2),
    "torchvision.models.video.swin_transformer.shifted_window_attention_3d": (1, 2),
}


def _qualified_name(target) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def _linear_kernel_modules() -> dict[type, tuple[int, ...]]:
    from ..capture.attention import KERNEL_POSITIONS, AttentionKernels

    return {AttentionKernels: KERNEL_POSITIONS}


#: call_module targets of these types take linear kernels at these argument positions
LINEAR_KERNEL_MODULES: dict[type, tuple[int, ...]] = _linear_kernel_modules()


@dataclasses.dataclass
class KernelCall:
    """A convolution or linear call, normalised: ``arguments`` has every name of ``ARGUMENTS[kind]``."""

    node: fx.Node
    kind: str  # "conv", "conv_transpose" or "linear"
    dims: int  # spatial dims, 0 for linear
    arguments: dict
    weight_transposed: bool = False

    @property
    def input(self):
        return self.arguments["input"]

    @property
    def weight(self):
        return self.arguments["weight"]

    @property
    def bias(self):
        return self.arguments["bias"]

    @property
    def geometry(self) -> dict:
        """Everything but input and weight (bias included), as compared between calls of one weight."""
        return {k: v for k, v in self.arguments.items() if k not in ("input", "weight")}


def schema_of(node: fx.Node) -> Schema | None:
    if node.op != "call_function":
        return None
    for table in (TORCH_KERNELS, ATEN_KERNELS):
        try:
            schema = table.get(node.target)
        except TypeError:  # unhashable target
            return None
        if schema is not None:
            return schema
    return None


def kernel_call(node: fx.Node) -> KernelCall | None:
    """The normalised kernel call ``node`` is, or None (not a kernel, or arguments that do not fit)."""
    schema = schema_of(node)
    if schema is None:
        return None
    if len(node.args) > len(schema.names) or set(node.kwargs) - set(schema.names):
        return None
    args = dict(zip(schema.names, node.args))
    args.update(node.kwargs)
    if "input" not in args or "weight" not in args:
        return None
    kind, dims = schema.kind, schema.dims
    if kind == "convolution":
        kind = "conv_transpose" if args.pop("transposed", False) else "conv"
        if kind == "conv":
            args.pop("output_padding", None)
        stride = args.get("stride", 1)
        dims = len(stride) if isinstance(stride, (list, tuple)) else _rank_of(args["weight"]) - 2
    if schema.weight_transposed:  # addmm's bias is whatever tensor is added; only the weight matters
        args = {"input": args["input"], "weight": args["weight"], "bias": args.get("bias")}
    names = ARGUMENTS[kind]
    for name in names[2:]:
        args.setdefault(name, _DEFAULTS[name])
    return KernelCall(node, kind, dims, {n: args[n] for n in names}, schema.weight_transposed)


def kernel_inputs(gm: fx.GraphModule, node: fx.Node) -> Iterator[tuple[str, int, object]]:
    """(kind, dims, weight argument) for each kernel ``node`` takes: a conv/linear call, or a table entry."""
    call = kernel_call(node)
    if call is not None:
        yield call.kind, call.dims, call.weight
        return
    positions = ()
    if node.op == "call_function":
        positions = LINEAR_KERNEL_CALLS.get(_qualified_name(node.target), ())
    elif node.op == "call_module":
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:
            module = None
        positions = next((p for t, p in LINEAR_KERNEL_MODULES.items() if isinstance(module, t)), ())
    for position in positions:
        if position < len(node.args):
            yield "linear", 0, node.args[position]


def _rank_of(value) -> int:
    meta = getattr(value, "meta", {}).get("val") if isinstance(value, fx.Node) else value
    return meta.dim() if isinstance(meta, torch.Tensor) else 4
