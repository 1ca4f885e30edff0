"""Input shapes around capture: which dimensions are free, and inputs of other shapes to check with.

* :func:`dynamic_spec`: torch.export's ``dynamic_shapes`` for the call, ``Dim.AUTO`` on every dimension
  of every tensor input, keyed by the forward's own parameter names (torch.export matches the spec to the
  forward's signature, not to the ``(args, kwargs)`` pair); a dimension of size 0 or 1 in the example is left
  static, as torch.export would make it anyway (with ``Dim.AUTO`` it did, and warned on every save: the
  demo's one-channel inputs printed two such warnings).
* :func:`resized`: the example inputs with some dimensions resized by tiling (index ``i`` takes element
  ``i mod n``), so token ids, masks and class indices stay valid values.
* :func:`batch_of_two`: where every tensor input has a leading dimension of 1 (one sample), the same
  inputs with two samples: export specialises a size-1 dimension, and train-mode batch norm cannot run
  on one sample.
* :func:`other_shapes`: for a graph exported with free dimensions, inputs of other sizes, each free size
  changed together with every size torch.export found equal to it, for the capture check to run on;
  :func:`size_one_inputs`: each free size at 1 (which torch.export's free sizes never are while it traces).
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree


def dynamic_spec(forward, args: tuple, kwargs: dict, batch_only: bool = False) -> dict | tuple:
    """``Dim.AUTO`` for every dimension of every tensor input (module docstring), or for the first only; none for
    a dimension of size 0 or 1 (torch.export specialises those)."""

    def spec(value):
        if isinstance(value, torch.Tensor):
            dims = range(min(value.dim(), 1) if batch_only else value.dim())
            return {i: torch.export.Dim.AUTO for i in dims if value.shape[i] > 1}
        return None

    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(pytree.tree_map(spec, tuple(args))) + tuple(pytree.tree_map(spec, dict(kwargs)).values())
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def resized(args: tuple, kwargs: dict, sizes: dict[tuple[int, int], int]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with flat leaf ``i``'s dimension ``d`` resized to ``sizes[(i, d)]`` by tiling."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            for (j, d), n in sizes.items():
                if j == i and leaf.shape[d] != n:
                    index = torch.arange(n, device=leaf.device) % max(leaf.shape[d], 1)
                    leaf = leaf.index_select(d, index)
        out.append(leaf)
    new_args, new_kwargs = pytree.tree_unflatten(out, spec)
    return tuple(new_args), dict(new_kwargs)


def with_batch(args: tuple, kwargs: dict, size) -> tuple[tuple, dict] | None:
    """The inputs with the leading dimension of every tensor input resized to ``size(n)``, where they all
    share one leading size ``n``; else None."""
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    found = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not found or len({leaves[i].shape[0] for i in found}) != 1:
        return None
    return resized(args, kwargs, {(i, 0): size(leaves[found[0]].shape[0]) for i in found})


def batch_of_two(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with two samples where every tensor input holds one (module docstring), else None."""
    return with_batch(args, kwargs, lambda n: 2) if _leading_size(args, kwargs) == 1 else None


def one_more_sample(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with one more sample where every tensor input has the same leading size, else None
    (for a traced graph, which records no sizes: the batch is the one size nearly every model frees)."""
    return with_batch(args, kwargs, lambda n: n + 1)


def one_sample(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with one sample where every tensor input has the same leading size, above 1; else None
    (torch.export takes a free size for never 1: the capture check runs this call to find a branch the model
    takes at a batch of one only)."""
    size = _leading_size(args, kwargs)
    return with_batch(args, kwargs, lambda n: 1) if size is not None and size > 1 else None


def _leading_size(args: tuple, kwargs: dict) -> int | None:
    sizes = {v.shape[0] for v in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(v, torch.Tensor) and v.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _free_sizes(gm: fx.GraphModule, args: tuple, kwargs: dict):
    """``(dims, hints)`` of ``gm``'s placeholders: ``(leaf, dim, sympy expression)`` per symbolic dimension, and
    each free symbol's size in the example; None where the graph and the example do not line up."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    if len(placeholders) != len(leaves):
        return None
    dims: list[tuple[int, int, Any]] = []
    hints: dict[Any, int] = {}
    for i, (node, leaf) in enumerate(zip(placeholders, leaves)):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(leaf, torch.Tensor) or value.dim() != leaf.dim():
            continue
        for d, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                dims.append((i, d, expr))
                if expr.is_Symbol:
                    hints[expr] = int(leaf.shape[d])
    return dims, hints


def _with_sizes(args: tuple, kwargs: dict, dims: list, values: dict) -> tuple[tuple, dict] | None:
    """The inputs with every symbolic dimension at its expression's value under ``values`` (None: a size below 1)."""
    sizes = {}
    for i, d, expr in dims:
        if expr.free_symbols <= set(values):
            size = int(expr.subs(values))
            if size < 1:
                return None
            sizes[(i, d)] = size
    return resized(args, kwargs, sizes) if sizes else None


def other_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Iterator[tuple[tuple, dict, str]]:
    """Inputs of other sizes that ``gm`` (exported with free dimensions) admits, with what changed.

    Each free size (a symbol of the placeholders' shapes) moves, together with every dimension that
    shares it: first to half its example size (cheap), then one more (odd sizes), then double; sizes
    computed from a symbol follow it. Whether the graph's guards and the model accept the inputs is for
    the caller to find out by running them.
    """
    found = _free_sizes(gm, args, kwargs)
    if found is None or not found[1]:
        return
    dims, hints = found
    for name, move in (("half", lambda h: h // 2), ("plus one", lambda h: h + 1), ("double", lambda h: 2 * h)):
        moved = _with_sizes(args, kwargs, dims, {s: move(h) if move(h) >= 2 else h + 1 for s, h in hints.items()})
        if moved is not None:
            yield *moved, name


def size_one_inputs(gm: fx.GraphModule | None, args: tuple, kwargs: dict) -> Iterator[tuple[tuple, dict, str]]:
    """Inputs with one free size at 1 (with those of its kind, below) and the others as in the example, one after
    another, for a graph exported with free dimensions (torch.export takes a free size for never 1 while it
    traces: a branch the model takes at size 1 only is not in the graph, and the guards admit 1 as torch does);
    for a traced graph, which reads sizes at run time, one sample (:func:`one_sample`)."""
    found = _free_sizes(gm, args, kwargs) if gm is not None else None
    if found is None:
        one = one_sample(args, kwargs)
        if one is not None:
            yield *one, "one sample"
        return
    dims, hints = found
    # free sizes of one kind move together: the same dimension (index) of the same example size (a batch of
    # input_ids and of its attention mask, which torch.export may leave unrelated: a mask of one sample beside
    # ids of two is no input a caller gives)
    kinds: dict[tuple[int, int], list] = {}
    for symbol, hint in hints.items():
        if hint != 1:
            index = min(d for _, d, expr in dims if expr == symbol)
            kinds.setdefault((index, hint), []).append(symbol)
    for symbols in kinds.values():
        moved = _with_sizes(args, kwargs, dims, {**hints, **{symbol: 1 for symbol in symbols}})
        if moved is not None:
            where = [f"input {i} dim {d}" for i, d, expr in dims if expr in symbols]
            yield *moved, f"a size of 1 ({', '.join(where)})"
