"""Put a model's Python state back as it was: what capture promises to leave untouched.

Capturing runs a model's own Python: torch.export on fake tensors, torch.fx on proxies, the capture
check on the example inputs. A forward may write to its modules while it runs: a detection head that
caches its anchors and strides for the shape it saw, a pooler that stores its scales, a module that
registers a buffer on first use. Left behind, those are fake tensors or proxies on the working copy
(the next run reads them and fails), or state written into the user's model by a call the user never
made. :class:`Snapshot` records each module's attributes and its parameter, buffer, child and hook
dictionaries (shallow: the tensor objects, not their values), and the contents of its plain dict,
list and set attributes, and :meth:`Snapshot.restore` puts every one back, containers by content so
that references to them stay valid.
"""

from __future__ import annotations

import copy

import torch.nn as nn

# the hook tables too: a forward may install hooks on its first call and mark itself done (Hugging Face's
# output capturing sets _output_capturing_hooks_installed): with the mark taken back but the hooks kept,
# the next call would install them twice and record every hidden state twice
_CONTAINERS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_hooks", "_backward_pre_hooks")


_PLAIN = (dict, list, set)
# a GraphModule's meta: what the first-call check decided about a part (ipfx.capture.first_call) stays decided,
# also when it was decided during a call whose state is put back
_OWN = ("meta",)


class Snapshot:
    """The attributes of every module of ``model`` (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = {m: (dict(vars(m)), {k: dict(vars(m)[k]) for k in _CONTAINERS if k in vars(m)},
                          set(vars(m).get("_non_persistent_buffers_set", ())))
                      for m in model.modules()}
        # plain dicts, lists and sets a forward may fill in place (LeViT caches its attention biases per
        # device in a dict: under torch.export, a fake tensor), by content
        self.contents = {id(v): (v, copy.copy(v)) for m in self.saved for k, v in vars(m).items()
                         if k not in _CONTAINERS and k not in _OWN and type(v) in _PLAIN}

    def restore(self) -> None:
        for value, content in self.contents.values():
            value.clear()
            if isinstance(value, list):
                value.extend(content)
            else:
                value.update(content)
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
