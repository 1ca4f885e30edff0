"""Does a captured model compute what the model computes? Compared on example inputs, in both modes.

Each side runs from the same state: buffers that a train-mode forward updates (batch-norm running
statistics) are put back after every run, and the random generator is reseeded before each, so dropout
draws the same masks on both sides. Outputs are compared leaf by leaf (``torch.utils._pytree`` flattens
tuples, dicts and Hugging Face ``ModelOutput`` s): each floating tensor relative to its largest
magnitude, everything else for equality. So are the buffers each side leaves (:func:`buffer_state`,
:func:`state_difference`): a graph that computes the output but leaves out a buffer update (a buffer
registered as ``None`` and set by the forward, ``self.last = y.mean()``) loses the model's state.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .snapshot import Snapshot

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def run(module: nn.Module, args: tuple, kwargs: dict, training: bool, state_of: nn.Module | None = None,
        with_state: bool = False) -> Any:
    """``module(*args, **kwargs)`` in the given mode, leaving ``module`` (and ``state_of``, when the module
    runs another's graph) as it was: every buffer's values, and every module's attributes (a forward that
    caches things on itself at its first call leaves nothing behind: :mod:`ipfx.capture.snapshot`).
    ``with_state``: returns ``(output, buffers before, buffers after)`` (:func:`buffer_state` of ``module``)."""

    def call():
        module.train(training)
        if not with_state:
            return module(*args, **kwargs)
        before = buffer_state(module)
        output = module(*args, **kwargs)
        return output, before, buffer_state(module)

    return isolated(call, module, state_of)


def isolated(call, *modules: nn.Module | None) -> Any:
    """``call()`` without autograd, with the random generator seeded to 0 (dropout draws the same masks
    on both sides of a comparison) and put back after, leaving every buffer value and module attribute of
    ``modules`` as it was (and the parameters a forward changes in place: :data:`_CHANGES_WEIGHT`)."""
    buffers = {id(b): b for m in modules if m is not None for b in m.buffers()}
    # and the parameters a forward changes in place (a table: an embedding with max_norm renormalises the rows it
    # reads; the check's calls changed the user's model and the transformed one)
    buffers.update((id(p), p) for m in modules if m is not None for p in changing_parameters(m))
    saved = {key: b.detach().clone() for key, b in buffers.items()}
    snapshots = [Snapshot(m) for m in modules if m is not None]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # values only: no autograd graph
            torch.manual_seed(0)
            return call()
    finally:
        for snapshot in snapshots:
            snapshot.restore()  # training flags included
        with torch.no_grad():
            for key, b in buffers.items():
                if b.shape == saved[key].shape:
                    b.copy_(saved[key])


def buffer_slots(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every buffer of ``module``'s tree by path, those registered as ``None`` included (``named_buffers``
    leaves them out: a buffer a forward sets on its first call, ``register_buffer("run", None)``)."""
    return {f"{path}.{name}" if path else name: b for path, m in module.named_modules(remove_duplicate=False)
            for name, b in m._buffers.items()}


def buffer_state(module: nn.Module, over: nn.Module | None = None) -> dict[str, torch.Tensor | None]:
    """Copies of the buffers of ``module`` by path (:func:`buffer_slots`); with ``over``, its buffer where it
    holds one at a path of ``module``'s (not its others: a graph's constants). A tensor held at several paths
    (one buffer registered on two modules) once, at its first path: a graph may hold it at one of them."""
    slots = buffer_slots(module)
    if over is not None:
        held = buffer_slots(over)
        slots = {path: held[path] if path in held else b for path, b in slots.items()}
    seen: set[int] = set()
    state = {}
    for path, b in slots.items():
        if b is not None and id(b) in seen:
            continue
        if b is not None:
            seen.add(id(b))
        state[path] = None if b is None else b.detach().clone()
    return state


UNSET = "registered as None"  # in state_difference's message where the model's forward set such a buffer
_MISSING = object()


def state_difference(actual: dict, expected: dict, actual_before: dict | None = None,
                     expected_before: dict | None = None) -> str | None:
    """What differs between the buffers two calls left (:func:`buffer_state`; ``expected``: the model's), or
    None. With the states before each call, only the buffers that either call set or changed are compared (the
    two sides may hold different buffers that neither call touches). A buffer the model's forward set where it
    was registered as None (or not registered) and the other call left unset says :data:`UNSET`."""
    def changed(after: dict, before: dict | None, path: str) -> bool:
        if before is None:
            return True
        a, b = after.get(path, _MISSING), before.get(path, _MISSING)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return a is not b
        return a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)

    for path in sorted(actual.keys() | expected.keys()):
        if not (changed(actual, actual_before, path) or changed(expected, expected_before, path)):
            continue
        a, e = actual.get(path, _MISSING), expected.get(path, _MISSING)
        if not isinstance(a, torch.Tensor) and not isinstance(e, torch.Tensor):
            continue
        if not isinstance(e, torch.Tensor):
            return (f"buffer {path}: a tensor where the model's forward sets it to None" if e is None else
                    f"buffer {path}: set, where the model holds no such buffer")
        if not isinstance(a, torch.Tensor):
            if expected_before is not None and not isinstance(expected_before.get(path), torch.Tensor):
                return f"buffer {path}, {UNSET} or not registered: left unset where the model's forward sets it"
            return (f"buffer {path}: None where the model's forward leaves a tensor" if a is None else
                    f"buffer {path}: not held by the graph, where the model's forward changes it")
        problem = difference(a, e)
        if problem is not None:
            return f"buffer {path}: {problem.split(': ', 1)[-1]}"
    return None


#: modules whose forward changes their own parameters in place (where ``max_norm`` is set)
_CHANGES_WEIGHT = (nn.Embedding, nn.EmbeddingBag)


def changing_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module``'s tree its forward changes in place (:data:`_CHANGES_WEIGHT`): what a call
    made for capture or a check must put back."""
    return [p for sub in module.modules() if isinstance(sub, _CHANGES_WEIGHT) and getattr(sub, "max_norm", None)
            is not None for p in sub.parameters(recurse=False)]


def shapes(args: tuple, kwargs: dict) -> str:
    """The shapes of the tensor inputs, for messages: ``(2, 3, 32, 32), mask=(2, 16)``."""
    parts = [str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)]
    parts += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return ", ".join(parts)


def difference(actual: Any, expected: Any) -> str | None:
    """None when ``actual`` matches ``expected`` (module docstring), else what differs."""
    got, got_spec = pytree.tree_flatten(actual, is_leaf=_unregistered_mapping)
    want, want_spec = pytree.tree_flatten(expected, is_leaf=_unregistered_mapping)
    got, want = _open_mappings(got), _open_mappings(want)
    if len(got) != len(want):
        return f"{len(got)} output values instead of {len(want)}"
    for i, (a, e) in enumerate(zip(got, want)):
        where = f"output {i}" if len(want) > 1 else "the output"
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != e.shape:
                return f"{where}: shape {tuple(getattr(a, 'shape', ()))} instead of {tuple(e.shape)}"
            if e.is_floating_point() or e.is_complex():
                err = relative_error(a, e)
                if err > TOLERANCE.get(e.dtype, 1e-4):
                    return f"{where}: relative error {err:.3g}"
            elif not torch.equal(a, e):
                return f"{where}: values differ"
        elif type(a) is type(e) and type(e).__eq__ is object.__eq__ and a is not e:
            return (f"{where}: a {type(e).__name__}, which has no == to compare it by; make the model return "
                    "tensors, numbers and containers of them (a transformers model: use_cache=False)")
        elif a != e and not (isinstance(a, float) and isinstance(e, float) and abs(a - e) <= 1e-6 * abs(e)):
            return f"{where}: {a!r} instead of {e!r}"
    return None


def _unregistered_mapping(value: Any) -> bool:
    """A dict subclass pytree does not know (a model's own output class): compared as its items."""
    return isinstance(value, dict) and type(value) not in pytree.SUPPORTED_NODES


def _open_mappings(leaves: list) -> list:
    out = []
    for leaf in leaves:
        if _unregistered_mapping(leaf):
            out += _open_mappings(pytree.tree_leaves(dict(leaf), is_leaf=_unregistered_mapping))
        else:
            out.append(leaf)
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (0 for empty tensors; NaNs in the same places agree)."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(e)
    diff = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    scale = torch.where(torch.isnan(e), torch.zeros_like(e), e.abs()).max().item()
    return float(diff.max().item()) / max(scale, 1e-12)


def localise(model: nn.Module, captured: nn.Module, args: tuple, kwargs: dict, training: bool) -> str | None:
    """The innermost module whose own output differs between ``model`` and an exported ``captured``.

    The model's module outputs are recorded with forward hooks; the graph's with an interpreter, each
    module's output being the last node of that module (``nn_module_stack`` metadata of torch.export).
    """
    import torch.fx as fx

    graph_module = captured.graph_module(training) if hasattr(captured, "graph_module") else captured
    if not isinstance(graph_module, fx.GraphModule):
        return None
    last: dict[str, fx.Node] = {}
    for node in graph_module.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            last[path] = node
    expected: dict[str, Any] = {}
    order: list[str] = []
    hooks = []
    for path, m in model.named_modules():
        if path and path in last:
            def hook(_, __, out, path=path):
                if path not in expected:
                    expected[path] = out
                    order.append(path)
            hooks.append(m.register_forward_hook(hook))
    try:
        run(model, args, kwargs, training)
    finally:
        for h in hooks:
            h.remove()
    values: dict[fx.Node, Any] = {}
    wanted = {last[p] for p in order}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                values[n] = value
            return value

    with contextlib.suppress(Exception):
        run(_Callable(lambda *a, **k: Recorder(graph_module).run(*pytree.tree_leaves((a, k)))), args, kwargs,
            training, state_of=graph_module)
    differing = [p for p in order if last[p] in values and _tensor(expected[p]) is not None
                 and _tensor(values[last[p]]) is not None
                 and difference(_tensor(values[last[p]]), _tensor(expected[p])) is not None]
    innermost = [p for p in differing if not any(q.startswith(p + ".") for q in differing)]
    if not innermost:
        return None
    path = innermost[0]
    return f"{path} ({type(model.get_submodule(path)).__name__})"


class _Callable(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _tensor(value):
    leaves = [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
    return leaves[0] if len(leaves) == 1 else None
