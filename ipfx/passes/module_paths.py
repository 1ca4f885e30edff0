"""Pass (:func:`ipfx.deploy.load_module`): the module paths a loaded program's forward walks, as attributes.

The forward that ``torch.fx`` generates for a loaded program reaches each called module by a chain of
attribute reads, ``getattr(getattr(self.features, "4").block, "2").fc1(...)``: three to four per call of a
mobilenet_v3_large layer. A submodule is not an instance attribute of its parent but an entry of its
``_modules``, so every read fails the ordinary lookup first and then runs ``nn.Module.__getattr__`` in Python
(~1 us each, and more between two kernels). torch.export's unflattening makes every container on those
paths a plain ``nn.Module``; this pass makes each of them a :class:`PathModule`, which keeps every submodule
in its instance ``__dict__`` as well (an ordinary attribute hit), and keeps that copy right through every
way ``nn.Module`` changes a submodule. Nothing else about the container changes: its state-dict keys,
children and repr are its ``_modules``'. It returns early for containers of any other class (their own
``__setattr__`` could change submodules by ways this one does not follow). Measured: a loaded
mobilenet_v3_large at 95% runs in 0.95x the time at batch 1 (2 threads, median of 9 interleaved rounds,
0.88-1.02), resnet50 0.975x.
"""

from __future__ import annotations

import torch.nn as nn

from .manager import GraphPass, GraphSite, PassResult


class PathModule(nn.Module):
    """A plain container whose submodules are also instance attributes (module docstring).

    The copy in ``__dict__`` is written and removed with the entry of ``_modules`` by ``setattr``,
    ``delattr`` and ``add_module``/``register_module``; a write into ``_modules`` by hand is not followed
    (as with any ``nn.Module``, that is not an interface)."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self._follow(name)

    def __delattr__(self, name):
        super().__delattr__(name)
        self._follow(name)

    def add_module(self, name, module):
        super().add_module(name, module)
        self._follow(name)

    def _follow(self, name: str) -> None:
        """``__dict__[name]`` is ``_modules[name]`` where that is a module, and absent otherwise (a module in
        ``__dict__`` is only ever this copy: ``nn.Module`` stores every module it is given in ``_modules``)."""
        state = self.__dict__
        child = state.get("_modules", {}).get(name)
        if child is not None:
            state[name] = child
        elif isinstance(state.get(name), nn.Module):
            del state[name]


def as_path_module(module: nn.Module) -> bool:
    """Make a plain ``nn.Module`` a :class:`PathModule` in place; False (and nothing done) for any other class."""
    if type(module) is not nn.Module:
        return False
    module.__class__ = PathModule
    for name in module._modules:
        module._follow(name)
    return True


class ModulePathsAsAttributes(GraphPass):
    """Make the plain containers below the graph module :class:`PathModule` s (module docstring). Changed:
    their paths; skipped: containers of other classes, with the class."""

    name = "module paths as attributes"

    def run_graph(self, site: GraphSite) -> PassResult:
        result = PassResult()
        for path, module in site.gm.named_modules():
            if module is site.gm or not module._modules:
                continue
            if as_path_module(module):
                result.changed.append(path)
            elif type(module) is not PathModule:
                result.skipped[path] = f"a {type(module).__name__}, not a plain nn.Module"
        return result
