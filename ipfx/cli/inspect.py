"""What ``ipfx inspect`` prints: per-weight tables of a module, a state dict or an exported program.

Each function returns the lines to print, so the command stays a thin layer and tests read the text.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn as nn

# kernels whose second argument is the weight (or, for the ipfx ops, the kept values)
_DENSE_KERNELS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                  "convolution", "linear")
_FUSED_KERNELS = {"ip_conv": 5, "sparse_linear": 4}  # op name -> position of weight_shape


def describe_module(model: nn.Module, space: str = "ip") -> list[str]:
    """What :func:`ipfx.transform` rewrote (or would rewrite) in ``model``, per weight.

    A module with nothing to rewrite (a fused lowering: its kernels are sparse ops) is shown by its
    tensors instead.
    """
    from ..api import rewritten_weights, sparsity, transform
    from ..form.reparam import is_transformed

    transformed = is_transformed(model)
    view = model if transformed else transform(model, space=space)
    infos = rewritten_weights(view)
    if not infos:
        return describe_state(type(model).__name__, model.state_dict())
    total = sum(p.numel() for p in model.parameters())
    width = max(len(i.name) for i in infos)
    lines = [f"{type(model).__name__}: {total:,} parameters; "
             f"{'transformed' if transformed else 'transform would rewrite'} {len(infos)} weights:",
             f"{'weight':<{width}}  {'shape':<20} {'kind':<14} {'space':<5} {'basis':<16} {'kept':>10} {'total':>10} "
             f"{'sparsity':>8}"]
    for i in infos:
        basis = i.basis + ("" if i.trains_basis or i.basis == "none" else " (fixed)")
        lines.append(f"{i.name:<{width}}  {str(i.shape):<20} {i.kind:<14} {i.space:<5} {basis:<16} {i.kept:>10,} "
                     f"{i.total:>10,} {1 - i.kept / i.total:>8.4f}")
    coeffs = sum(i.total for i in infos)
    lines.append(f"prunable coefficients: {coeffs:,} ({100 * coeffs / total:.1f}% of parameters); "
                 f"sparsity {sparsity(view):.4f}")
    return lines


def describe_state(name: str, obj) -> list[str]:
    """Every tensor in ``obj`` (a state dict, or any nest of dicts and lists holding tensors).

    Masks (``*.mask``, as in a transformed model's state dict) also give the model's sparsity: the
    masked fraction over all of them.
    """
    tensors = dict(_tensors(obj))
    if not tensors:
        return [f"{name}: holds no tensors (a {type(obj).__name__})"]
    width = max(len(k) for k in tensors)
    values = sum(t.numel() for t in tensors.values())
    lines = [f"{name}: {len(tensors)} tensors, {values:,} values:",
             f"{'tensor':<{width}}  {'shape':<20} {'dtype':<10} {'nonzero':>10} {'total':>10}"]
    for key, t in tensors.items():
        lines.append(f"{key:<{width}}  {str(tuple(t.shape)):<20} {str(t.dtype).replace('torch.', ''):<10} "
                     f"{_count(_nonzero(t)):>10} {t.numel():>10,}")
    masks = [t for k, t in tensors.items() if k.endswith(".mask")]
    if masks and all(_nonzero(m) is not None for m in masks):
        kept, total = sum(_nonzero(m) for m in masks), sum(m.numel() for m in masks)
        lines.append(f"{len(masks)} masks: {kept:,} of {total:,} coefficients kept; sparsity {1 - kept / total:.4f}")
    return lines


def describe_store(path) -> list[str]:
    """An ``ipfx compare`` result store: how many runs it holds, and their table (lines that are not
    records are reported by the store and left out)."""
    from ..experiments import ResultStore, markdown_table

    records = ResultStore(path).records()
    if not records:
        return [f"{path}: a result store with no records"]
    runs = {(r["model"], r["dataset_name"]) for r in records}
    return [f"{path}: a result store of {len(records)} run(s) ({', '.join(sorted(f'{m} on {d}' for m, d in runs))})",
            "", markdown_table(records)]


def describe_program(name: str, program: torch.export.ExportedProgram) -> list[str]:
    """An exported program's kernel calls and, per conv/linear weight, its stored nonzeros.

    For the fused ops (``ipfx.ip_conv``, ``ipfx.sparse_linear``) the stored values are the kept
    coefficients and the total is the kernel's size, so the sparsity is the pruned fraction; for plain
    ATen kernels it is the fraction of zeros in the (folded, usually dense) weight.
    """
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    tensors = {**program.state_dict, **program.constants}
    calls, rows = Counter(), []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "_opname", None) or str(node.target)
        namespace = getattr(node.target, "namespace", "")
        calls[f"{namespace}.{op}" if namespace else op] += 1
        row = _kernel_row(namespace, op, node, names, tensors)
        if row is not None:
            rows.append(row)
    values = sum(t.numel() for t in tensors.values() if isinstance(t, torch.Tensor))
    lines = [f"{name}: torch.export program, {len(tensors)} tensors, {values:,} values; calls "
             + ", ".join(f"{op} x{n}" for op, n in sorted(calls.items()))]
    if rows:
        width = max(len(r[0]) for r in rows)
        lines.append(f"{'weight':<{width}}  {'op':<22} {'shape':<20} {'nonzero':>10} {'total':>10} {'sparsity':>8}")
        for weight, op, shape, nonzero, total in rows:
            lines.append(f"{weight:<{width}}  {op:<22} {str(shape):<20} {nonzero:>10,} {total:>10,} "
                         f"{1 - nonzero / total:>8.4f}")
        nonzero, total = sum(r[3] for r in rows), sum(r[4] for r in rows)
        lines.append(f"conv/linear weights: {nonzero:,} of {total:,} stored as nonzeros; sparsity "
                     f"{1 - nonzero / total:.4f}")
    return lines


def _kernel_row(namespace: str, op: str, node, names: dict, tensors: dict):
    """(weight name, op, weight shape, nonzeros, total) for a conv/linear call, else None."""
    if namespace == "ipfx" and op in _FUSED_KERNELS:
        values = _tensor_arg(node, 1, names, tensors)
        shape = tuple(int(s) for s in node.args[_FUSED_KERNELS[op]])
        if values is None:
            return None
        weight = names.get(node.args[1].name, node.args[1].name).removesuffix(".values")
        return weight, f"ipfx.{op}", shape, values.numel(), math.prod(shape)
    if namespace == "aten" and op in _DENSE_KERNELS:
        weight = _tensor_arg(node, 1, names, tensors)
        if weight is None or _nonzero(weight) is None:
            return None
        return names.get(node.args[1].name, node.args[1].name), f"aten.{op}", tuple(weight.shape), _nonzero(weight), \
            weight.numel()
    return None


def _tensor_arg(node, index: int, names: dict, tensors: dict):
    arg = node.args[index] if len(node.args) > index else None
    if not isinstance(arg, torch.fx.Node):
        return None
    found = tensors.get(names.get(arg.name, arg.name))
    return found if isinstance(found, torch.Tensor) else None


def _tensors(obj, prefix: str = ""):
    """(dotted name, tensor) for every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "tensor", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}.{i}" if prefix else str(i))


_SPARSE_LAYOUTS = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _nonzero(t: torch.Tensor) -> int | None:
    """The tensor's nonzero numbers, whatever its layout (sparse: its stored values that are not zero;
    quantized: those not at the zero point); None for a tensor without data (the meta device)."""
    if t.numel() == 0:
        return 0
    if t.is_meta:
        return None
    if t.is_quantized:
        t = t.dequantize()
    if t.layout == torch.sparse_coo:
        t = t.coalesce().values()
    elif t.layout in _SPARSE_LAYOUTS:
        t = t.values()
    return int(torch.count_nonzero(t))


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"
