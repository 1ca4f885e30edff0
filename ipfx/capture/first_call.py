"""Without example inputs, each traced graph is checked against its module's own forward on first calls.

Symbolic tracing runs ``forward`` on proxies, not on the inputs the model will get: ``isinstance(x,
torch.Tensor)`` is False for a proxy, so a branch on it is decided at trace time, and so is anything
else Python decides from its inputs. A graph traced without example inputs may therefore compute
something else than its module on a real input, or fail where the module runs, and nothing at transform
time can tell. ``ipfx.transform(model)`` without example inputs therefore keeps, for every traced part,
the module it was traced from (its weights read the graph's coefficients, :mod:`ipfx.form.parametrize`, so
both compute the same function of the same trained tensors), and :func:`checked_call`, on the first call
of each *kind* (training mode and the structure of the arguments: their types, tensor dtypes and ranks,
which are ``None``; not their sizes, which a traced graph reads at run time):

1. runs the module's forward and the graph from the same state (buffers and attributes put back after
   each, the random generator seeded alike, no autograd) and compares the outputs (:mod:`ipfx.capture.verify`);
2. equal: calls of that kind run the graph, unchecked from then on; different, or the graph fails where
   the module runs: the part runs its module's forward for every call, with one warning saying so;
3. then makes the real call (autograd, buffer updates and random draws as usual).

So the first call of each kind costs three forwards of the part; later calls cost nothing extra. The
user's hooks do not run during the comparison, only for the real call. A
module that fails on the input fails as the original model would. Calls made while compiling or
exporting (fake or functional tensors, torch.jit's tracer) are not checked.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from . import replaced, verify
from ..errors import first_line, user_stacklevel

CHECK = "ipfx_check_first_calls"  # GraphModule.meta: the kinds of call already checked (a set)
USE_FORWARD = "ipfx_use_forward"  # GraphModule.meta: why the part runs its module's forward instead


def kind_of(training: bool, args: tuple, kwargs: dict) -> tuple:
    """What a traced graph may have specialised about a call (module docstring)."""
    def leaf(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", value.dtype, value.dim(), value.device.type)
        if value is None or isinstance(value, (bool, str)):
            return value
        return type(value).__name__

    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return (bool(training), str(spec), tuple(leaf(v) for v in leaves))


def sync_training(fallback: nn.Module, gm: nn.Module) -> None:
    """Give every module of ``fallback`` the training flag of the graph's module at its path (of the
    nearest ancestor the graph holds, for modules traced through): ``.train()``/``.eval()`` on the model
    reach the graph, not the fallback kept outside the tree, and modes may be mixed (a frozen batch norm)."""
    held = {path: m.training for path, m in gm.named_modules()}
    for path, module in fallback.named_modules():
        probe = path
        while probe not in held and probe:
            probe = probe.rpartition(".")[0]
        module.training = held.get(probe, gm.training)


def rebind_buffer(root: nn.Module, path: str, tensor, register: bool = False, persistent: bool = True) -> None:
    """``root``'s buffer at ``path`` becomes ``tensor`` (nothing where ``root`` holds no buffer there; with
    ``register``, a buffer it does not hold is registered on the module at that path, where it has one)."""
    owner, _, name = path.rpartition(".")
    try:
        holder = root.get_submodule(owner)
    except AttributeError:
        return
    table = holder.__dict__.get("_buffers")
    if table is not None and name in table:
        table[name] = tensor
    elif table is not None and register and tensor is not None and name not in vars(holder) and \
            name not in holder._parameters and name not in holder._modules:
        holder.register_buffer(name, tensor, persistent=persistent)


def share_rebound_buffers(fallback: nn.Module, gm: nn.Module, before: dict) -> None:
    """After ``fallback`` (the module's own forward) ran: a buffer its forward rebound (``self.k = self.k + 0.5``;
    ``before``: its buffers by path before the call, :func:`~.verify.buffer_slots`) or set where it was ``None``
    or absent (``register_buffer("run", None)``, then ``self.run = ...``) is the graph's buffer at that path from
    then on, as the buffers were shared at capture, and so is one the graph does not hold (a buffer its trace
    turned into a constant): the state dict, ``load_state_dict`` and the next call reach the tensor the forward
    uses (it kept its own, and the transformed model's state stayed at the capture's value, or had no such
    buffer)."""
    held = verify.buffer_slots(gm)
    for path, buffer in verify.buffer_slots(fallback).items():
        if before.get(path) is not buffer or (buffer is not None and path not in held):
            owner, _, name = path.rpartition(".")
            persistent = name not in fallback.get_submodule(owner)._non_persistent_buffers_set
            rebind_buffer(gm, path, buffer, register=True, persistent=persistent)


def checked_call(gm, graph_call: Callable[[], Any], forward: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The call of ``gm`` through ``graph_call`` or through ``forward`` (its module), checked on the first
    call of each kind (module docstring)."""
    if USE_FORWARD not in gm.meta and _checkable(args, kwargs):
        key = kind_of(gm.training, args, kwargs)
        seen = gm.meta.setdefault(CHECK, set())
        if key not in seen:
            seen.add(key)
            problem = _compare(gm, graph_call, forward, args, kwargs)
            if problem is not None:
                seen.discard(key)  # (a replaced module: raise on every call, not only the first)
                replaced.check_unchanged(gm)
                seen.add(key)
                gm.meta[USE_FORWARD] = problem
                warnings.warn(
                    f"the graph torch.fx traced for {type(forward).__name__} without example inputs "
                    f"{problem} on its first {'train' if gm.training else 'eval'}-mode call of this kind: "
                    f"{_why(problem)}. That part runs its module's own forward from now on (the same "
                    f"coefficients, pruned and trained alike). {_remedy(problem)}", stacklevel=user_stacklevel())
    if USE_FORWARD in gm.meta:
        replaced.check_unchanged(gm)
        sync_training(forward, gm)
        before = verify.buffer_slots(forward)
        try:
            return forward(*args, **kwargs)
        finally:
            share_rebound_buffers(forward, gm, before)
    try:
        return graph_call()
    except Exception as exc:  # a module replaced since capture: say so
        problem = replaced.changed_after_capture(gm)
        if problem is None:
            raise
        raise replaced.replaced_error(gm, problem) from exc


def _why(problem: str) -> str:
    if problem.startswith("leaves its buffers"):
        return "the graph does not do to the module's buffers what its forward does"
    return "tracing took a path this input does not take"


def _remedy(problem: str) -> str:
    if verify.UNSET in problem:
        return ("A buffer registered as None and set by the forward cannot be captured as a graph (neither by "
                "torch.fx nor by torch.export): register it as a tensor (torch.zeros(...)) to capture it")
    return "Pass example_inputs=... to ipfx.transform to capture it as a graph"


def _compare(gm, graph_call, forward: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """What differs between the graph's call and the module's own forward from the same state: the outputs, or
    the buffers each leaves (a graph that leaves out a buffer update computes the same output and loses the
    state), or None. The two share their buffers from capture: an in-place update is in both, a rebinding or a
    buffer set where it was None only in the one that made it, so after the graph's call its state is the
    module's buffers but where the graph holds one at the path."""
    before = verify.buffer_state(forward)  # (both sides start from it: verify.isolated puts it back)

    def own():
        sync_training(forward, gm)
        return forward(*args, **kwargs), verify.buffer_state(forward)

    def graph():
        return graph_call(), verify.buffer_state(forward, over=gm)

    with _hooks_silenced(gm, forward):  # the user's hooks see the real call only
        try:
            expected, expected_state = verify.isolated(own, gm, forward)
        except Exception:  # noqa: BLE001 - the module refuses this input: so would the model; nothing to compare
            return None
        try:
            actual, actual_state = verify.isolated(graph, gm, forward)
        except Exception as exc:  # noqa: BLE001 - the module ran, so the graph must
            return f"fails ({first_line(exc, 200)}) where the module runs"
    problem = verify.difference(actual, expected)
    if problem is not None:
        return f"computes something else than the module ({problem})"
    problem = verify.state_difference(actual_state, expected_state, before, before)
    return None if problem is None else f"leaves its buffers otherwise than the module ({problem})"


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _hooks_silenced(*modules: nn.Module):
    """Every module's hook tables emptied for the duration, and the same tables put back after."""
    saved, seen = [], set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen:  # a module both hold: its tables once, or the empty ones would be put back
                continue
            seen.add(id(m))
            tables = {k: vars(m)[k] for k in _HOOKS if k in vars(m)}
            saved.append((m, tables))
            for key, table in tables.items():
                vars(m)[key] = type(table)()
    try:
        yield
    finally:
        for m, tables in saved:
            vars(m).update(tables)


def _checkable(args: tuple, kwargs: dict) -> bool:
    """Real tensors only: not while torch.compile, torch.export, torch.jit.trace (the TorchScript ONNX
    exporter) or torch.fx run the model."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    leaves = pytree.tree_leaves((args, kwargs))
    return not any(isinstance(v, torch.fx.Proxy) for v in leaves) and all(
        type(v) in (torch.Tensor, nn.Parameter) for v in leaves if isinstance(v, torch.Tensor))
