"""Custom torch ops for deploying interspace-pruned models (``torch.ops.ipfx.*``).

Importing this package registers ``ipfx::ip_conv`` and ``ipfx::sparse_linear`` (once; Python's module cache
prevents re-registration). Layout by concern: ``storage`` (sparse format, cache), ``geometry`` (checks),
``kernels`` (evaluation orders), ``order`` (which order runs), ``native`` (the C++ kernel, built on first
use), ``gpu`` and ``triton_conv`` (the Triton kernel, CUDA), ``library`` (op registration), ``modules``
(``SparseIPConv``, ``SparseLinear``), ``pooling`` (max pooling on the native kernel, for frozen graphs),
``program`` (a loaded program's graph run as one native call);
``ip_conv`` re-exports them under the historical path.
"""

from . import ip_conv as _ip_conv_module  # noqa: F401  (loaded first: the name ``ip_conv`` below is the op)
from .library import ip_conv, sparse_linear
from .modules import SparseIPConv, SparseLinear
from .order import (
    ORDER_AUTO,
    ORDER_BASIS_FIRST,
    ORDER_COEFF_FIRST,
    ORDER_DENSE,
    ORDER_GPU,
    ORDER_NATIVE,
    ORDER_TUNED,
    choose_order,
    order_costs,
)
from .storage import sparse_coefficients

__all__ = [
    "ORDER_AUTO",
    "ORDER_BASIS_FIRST",
    "ORDER_COEFF_FIRST",
    "ORDER_DENSE",
    "ORDER_GPU",
    "ORDER_NATIVE",
    "ORDER_TUNED",
    "SparseIPConv",
    "SparseLinear",
    "choose_order",
    "ip_conv",
    "order_costs",
    "sparse_coefficients",
    "sparse_linear",
]
