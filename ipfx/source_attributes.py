"""Captured graphs answer for the module they replaced: its attributes, properties and methods.

Partial tracing replaces a submodule by its captured graph (a ``GraphModule`` or a ``ModeSwitch``), and
code outside the graph may still read what the module offered: a plain attribute (``out_channels``),
a property (segmentation-models-pytorch's ``encoder.output_stride``), a helper method or a ``config``.
:func:`keep_source` copies the module's plain instance attributes onto the graph and records its class;
:class:`SourceAttributes` then resolves any other name the graph lacks on that class, with the graph as
``self``, so properties and methods run against the copied attributes and the graph's submodules.
Both survive ``copy.deepcopy`` (torch.fx's user-preserved attributes for a ``GraphModule``).
"""

from __future__ import annotations

import inspect

import torch.fx as fx
import torch.nn as nn

from . import guards

_SOURCE = "_ipfx_source_class"
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, hooks, training, ...
_PLAIN = (int, float, str, bool, tuple, list, dict, type(None))


class SourceAttributes:
    """Mixin: names this module lacks are looked up on the class of the module it replaced."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get(_SOURCE)
            if source is None or name.startswith("__") or hasattr(nn.Module, name) or name == "forward":
                raise
            try:
                attr = inspect.getattr_static(source, name)
            except AttributeError:
                raise AttributeError(f"'{type(self).__name__}' (captured {source.__name__}) has no attribute "
                                     f"{name!r}") from None
            if hasattr(attr, "__get__"):  # property, function, classmethod, staticmethod
                return attr.__get__(self, source)
            return attr


class CapturedGraphModule(SourceAttributes, fx.GraphModule):
    """The ``GraphModule`` every ipfx front end returns; calls are checked against the call pattern
    symbolic tracing specialised (:mod:`ipfx.guards`), where there is one."""

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        guards.follow_forms([self])
        return result

    def __call__(self, *args, **kwargs):
        if guards.PATTERN in self.meta or guards.FALLBACK in self.meta:
            return guards.guarded_call(self, super().__call__, args, kwargs)
        return super().__call__(*args, **kwargs)


def plain_attributes(old: nn.Module, new: nn.Module) -> dict:
    """``old``'s plain instance attributes (``out_channels``, ``_depth``, ...) that ``new`` lacks."""
    return {key: value for key, value in vars(old).items()
            if key not in _MODULE_INTERNALS and key not in vars(new) and isinstance(value, _PLAIN)}


def keep_source(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` (the captured graph of ``old``) ``old``'s plain attributes and class (module docstring)."""
    if new is old:
        return
    preserved = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    values = plain_attributes(old, new)
    values[_SOURCE] = type(old)
    for key, value in values.items():
        new.__dict__[key] = value
        if preserved is not None and isinstance(new, fx.GraphModule):
            new.meta.setdefault(preserved, {})[key] = value
