"""ipfx: interspace pruning for PyTorch, as a torch.fx pass.

    model = ipfx.transform(model, space="ip")    # conv weights -> coeff x mask x basis
    ... train, prune (masks live in coefficient space) ...
    deployable = ipfx.lower(model, target="dense")   # or "fused"

The math and the public contract: docs/design.md in the repository.
"""

import importlib as _importlib
import sys as _sys

from .api import WeightInfo, lower, rewritten_weights, sparsity, transform
from .config import TransformConfig
from .errors import IPFXError, NotTransformedError, SingularBasisError, TraceError
from .capture.modes import ModeSwitch
from .form.reparam import BasisWeight
from .pruning import PruneReport, prune
from . import pruning
from . import ops  # registers torch.ops.ipfx.*: torch.export.load of a fused program needs them (~40 ms)

__version__ = "0.1.0"

#: Where the classes of whole models pickled before the layer packages (0.1.0 development) live now:
#: ``torch.load(path, weights_only=False)`` of such a file, and ``import ipfx.modes``, still find them.
_MOVED = {"modes": "capture.modes", "reparam": "form.reparam", "parametrize": "form.parametrize",
          "source_attributes": "capture.source_attributes"}
for _old, _new in _MOVED.items():
    _sys.modules.setdefault(f"{__name__}.{_old}", _importlib.import_module(f".{_new}", __name__))

#: Submodules reachable as ``ipfx.<name>`` after ``import ipfx``, imported at first use (they pull in more).
_LAZY = ("deploy", "experiments", "integrations")


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ipfx' has no attribute {name!r}")

__all__ = [
    "transform",
    "lower",
    "sparsity",
    "prune",
    "pruning",
    "PruneReport",
    "rewritten_weights",
    "TransformConfig",
    "BasisWeight",
    "ModeSwitch",
    "WeightInfo",
    "IPFXError",
    "NotTransformedError",
    "SingularBasisError",
    "TraceError",
    "deploy",
    "__version__",
]
