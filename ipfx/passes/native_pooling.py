"""Pass (``ipfx.lower(..., freeze=True)``, :func:`ipfx.deploy.load_module`): max pooling and global average
pooling on the native kernel.

A frozen graph's 2-d max pools (``nn.MaxPool2d`` calls of a symbolically traced graph; ``aten.max_pool2d``
or ``F.max_pool2d`` calls of an exported or loaded one) become calls of :class:`ipfx.ops.pooling.MaxPool2d`,
which is ``nn.MaxPool2d`` with the same arguments and computes, in eager inference on contiguous float CPU
tensors, the same numbers bit for bit on the native kernel (aten's NCHW kernel: 12% of resnet50's frozen
fused forward; :mod:`ipfx.ops.pooling`). Everywhere else (tracing, export, autograd, other devices) the
module is ``nn.MaxPool2d``, so a frozen model still exports as before. It returns early for pools that
return indices, and for calls whose arguments are computed (not constants): those stay as they are.

Likewise global average pools (``nn.AdaptiveAvgPool2d(1)``, ``adaptive_avg_pool2d(x, 1)`` of any spelling)
become :class:`ipfx.ops.pooling.GlobalAvgPool2d`: the native channel mean in eager inference (aten's runs on
one thread; the mean's last bits may differ from aten's), ``nn.AdaptiveAvgPool2d(1)`` everywhere else.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from ..ops.pooling import GlobalAvgPool2d, MaxPool2d
from .manager import GraphPass, GraphSite, PassResult

aten = torch.ops.aten

#: call_function targets of a 2-d max pool, and their argument names in order after the input
POOL_CALLS = {
    aten.max_pool2d.default: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    F.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    torch.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
}
_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}

#: call_function targets of a 2-d adaptive average pool (input, output size)
AVERAGE_CALLS = (aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d, F.adaptive_avg_pool2d,
                 torch._C._nn.adaptive_avg_pool2d)


def _add(gm: fx.GraphModule, name: str, pool: nn.Module) -> None:
    """``pool`` as ``gm``'s submodule ``name`` (replacing one there), in ``gm``'s mode."""
    gm.add_submodule(name, pool.train(gm.training))


def _global(output_size) -> bool:
    """An adaptive pool's output size of one position (1, (1, 1) or [1, 1]; not a node, not None)."""
    if isinstance(output_size, (list, tuple)):
        return len(output_size) == 2 and all(type(v) is int and v == 1 for v in output_size)
    return type(output_size) is int and output_size == 1


class NativePooling(GraphPass):
    """Replace 2-d max pools by :class:`~ipfx.ops.pooling.MaxPool2d` and global average pools by
    :class:`~ipfx.ops.pooling.GlobalAvgPool2d` (module docstring), each in the graph module's mode (a model
    saved in one mode records it: ``ipfx.deploy.save_program``). Changed: the pool modules' paths (new ones
    for function calls); skipped: pools left as they are, with the reason."""

    name = "native pooling"

    def run_graph(self, site: GraphSite) -> PassResult:
        result = PassResult()
        gm = site.gm
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.AdaptiveAvgPool2d:
                if _global(gm.get_submodule(node.target).output_size):
                    _add(gm, node.target, GlobalAvgPool2d())  # (replaces it)
                    result.changed.append(node.target)
                continue
            if node.op == "call_function" and node.target in AVERAGE_CALLS:
                x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
                size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
                if x is None or not _global(size) or len(node.args) + len(node.kwargs) != 2:
                    continue
                name = _free_name(gm, f"ipfx_pool_{node.name}")
                _add(gm, name, GlobalAvgPool2d())
                with gm.graph.inserting_before(node):
                    call = gm.graph.call_module(name, (x,))
                call.meta = dict(node.meta)
                node.replace_all_uses_with(call)
                gm.graph.erase_node(node)
                result.changed.append(name)
                continue
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if type(module) is not nn.MaxPool2d:
                    continue
                if module.return_indices:
                    result.skipped[node.target] = "it returns indices"
                    continue
                _add(gm, node.target, MaxPool2d.like(module.kernel_size, module.stride, module.padding,
                                                     module.dilation, module.ceil_mode))  # (replaces it)
                result.changed.append(node.target)
            elif node.op == "call_function" and node.target in POOL_CALLS:
                args = _arguments(node)
                if args is None:
                    result.skipped[node.name] = "its arguments are computed"
                    continue
                if args.pop("return_indices", False):
                    result.skipped[node.name] = "it returns indices"
                    continue
                name = _free_name(gm, f"ipfx_pool_{node.name}")
                _add(gm, name, MaxPool2d.like(**args))
                with gm.graph.inserting_before(node):
                    call = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
                call.meta = dict(node.meta)
                node.replace_all_uses_with(call)
                gm.graph.erase_node(node)
                result.changed.append(name)
        if result.changed:
            gm.graph.lint()
            gm.recompile()
        return result


def _arguments(node: fx.Node) -> dict | None:
    """The pool's arguments after the input by name, or None where one is not a constant."""
    names = POOL_CALLS[node.target]
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is not None:
        given = dict(normalized.kwargs)
    else:  # (a signature normalize_function does not read): by position, then keyword
        given = dict(zip(names, node.args[1:]))
        given.update({k: v for k, v in node.kwargs.items() if k in names})
    args = {k: given.get(k, _DEFAULTS.get(k)) for k in names}
    if any(isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and any(isinstance(a, fx.Node) for a in v))
           for v in args.values()):
        return None
    if "kernel_size" not in given:
        return None
    return args


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
