"""A captured graph's modules replaced after capture: said, not run around.

A graph reads its modules by name (``get_attr`` and ``call_module`` targets), and its fallback (the module
whose own forward runs for calls the graph does not take, :mod:`ipfx.capture.guards`) is a copy of the
original model kept outside the module tree: its unrewritten modules are the graph's own objects, its
rewritten ones read the graph's coefficients. Replacing a module of the transformed model
(``ip.fc = nn.Linear(512, 10)`` to fine-tune a new head) reaches neither: the graph no longer finds the
coefficients it reads under ``fc`` and fails, and the fallback, which runs in its place, still holds the old
head, so the model silently computed the old 1000-class output.

:func:`changed_after_capture` tells such a change from other failures, where a graph fails or its fallback
is about to run: a target of the graph that no longer resolves on the module tree, or a module the graph and
its fallback shared at capture (:func:`record_shared`) that the graph's tree now holds another object for.
:func:`replaced_error` is the error saying so, and what to do.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from ..errors import IPFXValueError

SHARED = "ipfx_shared_modules"  # GraphModule.meta key: paths of the modules the graph and its fallback share


def record_shared(gm: fx.GraphModule, fallback: nn.Module) -> None:
    """Record the paths at which ``gm`` and ``fallback`` hold the same module object (as strings: meta is saved
    and copied with the graph)."""
    theirs = dict(fallback.named_modules(remove_duplicate=False))
    gm.meta[SHARED] = tuple(path for path, module in gm.named_modules(remove_duplicate=False)
                            if path and theirs.get(path) is module)


def _resolve(root: nn.Module, target: str) -> Optional[str]:
    """None where ``root.<target>`` resolves, else the part of the path that is missing and what holds it."""
    value, seen = root, []
    for name in target.split("."):
        if not hasattr(value, name):
            owner = ".".join(seen) or "the model"
            return f"`{target}`, which the captured graph reads, is gone (`{owner}` is now a {type(value).__name__})"
        value = getattr(value, name)
        seen.append(name)
    return None


def changed_after_capture(gm: fx.GraphModule) -> Optional[str]:
    """What of ``gm``'s module tree was replaced since capture (module docstring), or None."""
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and isinstance(node.target, str):
            problem = _resolve(gm, node.target)
            if problem is not None:
                return problem
    fallback = gm.meta.get("ipfx_fallback")  # (ipfx.capture.guards.FALLBACK, which imports this module)
    if fallback is None:
        return None
    for path in gm.meta.get(SHARED, ()):
        try:
            mine, theirs = gm.get_submodule(path), fallback.get_submodule(path)
        except AttributeError:
            return f"`{path}` is gone"
        if mine is not theirs:
            return f"`{path}` was replaced (now a {type(mine).__name__})"
    return None


def replaced_error(gm: fx.GraphModule, problem: str) -> IPFXValueError:
    return IPFXValueError(
        f"a module of this transformed {type(gm).__name__} was replaced after ipfx.transform: {problem}. ipfx "
        "captured the model's graph and rewrote its weights when it was transformed, so neither the graph nor "
        "the model's own forward can run the new module. Make the change on the original model (a new head, "
        "a new layer) and call ipfx.transform on it then")


def check_unchanged(gm: fx.GraphModule) -> None:
    """Raise :func:`replaced_error` where ``gm``'s modules were replaced since capture."""
    problem = changed_after_capture(gm)
    if problem is not None:
        raise replaced_error(gm, problem)
