"""Put a model's Python state back as it was: what capture promises to leave untouched.

Capturing runs a model's own Python: torch.export on fake tensors, torch.fx on proxies, the capture
check on the example inputs. A forward may write to its modules while it runs: a detection head that
caches its anchors and strides for the shape it saw, a pooler that stores its scales, a module that
registers a buffer on first use. Left behind, those are fake tensors or proxies on the working copy
(the next run reads them and fails), or state written into the user's model by a call the user never
made. :class:`Snapshot` records each module's attributes and its parameter, buffer and child
dictionaries (shallow: the tensor objects, not their values) and :meth:`Snapshot.restore` puts every
one back, dictionaries by content so that references to them stay valid.
"""

from __future__ import annotations

import torch.nn as nn

_CONTAINERS = ("_parameters", "_buffers", "_modules")


class Snapshot:
    """The attributes of every module of ``model`` (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = {m: (dict(vars(m)), {k: dict(vars(m)[k]) for k in _CONTAINERS if k in vars(m)},
                          set(vars(m).get("_non_persistent_buffers_set", ())))
                      for m in model.modules()}

    def restore(self) -> None:
        for module, (attributes, containers, non_persistent) in self.saved.items():
            current = vars(module)
            if current.keys() != attributes.keys() or any(current[k] is not v for k, v in attributes.items()):
                current.clear()
                current.update(attributes)
            for key, content in containers.items():
                container = current[key]
                if container.keys() != content.keys() or any(container[k] is not v for k, v in content.items()):
                    container.clear()
                    container.update(content)
            kept = current.get("_non_persistent_buffers_set")
            if kept is not None and kept != non_persistent:
                kept.clear()
                kept.update(non_persistent)

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
