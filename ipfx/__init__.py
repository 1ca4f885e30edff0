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
    "__version__",
]
