"""ipfx: interspace pruning for PyTorch, as a torch.fx pass.

    model = ipfx.transform(model, space="ip")    # conv weights -> coeff x mask x basis
    ... train, prune (masks live in coefficient space) ...
    deployable = ipfx.lower(model, target="dense")   # or "fused"

The math and the public contract: docs/design.md in the repository.
"""

from .api import WeightInfo, lower, rewritten_weights, sparsity, transform
from .config import TransformConfig
from .errors import IPFXError, NotTransformedError, SingularBasisError, TraceError
from .modes import ModeSwitch
from .reparam import BasisWeight
from .pruning import PruneReport, prune
from . import pruning
from . import ops  # registers torch.ops.ipfx.*: torch.export.load of a fused program needs them (~40 ms)

__version__ = "0.1.0"

#: Submodules reachable as ``ipfx.<name>`` after ``import ipfx``, imported at first use (they pull in more).
_LAZY = ("deploy", "experiments", "integrations")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
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
