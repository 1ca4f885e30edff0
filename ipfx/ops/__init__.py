"""Custom torch ops for deploying interspace-pruned models (``torch.ops.ipfx.*``).

Importing this package registers ``ipfx::ip_conv`` and ``ipfx::sparse_linear`` (once; Python's module cache
prevents re-registration).
"""

from .ip_conv import (
    ORDER_AUTO,
    ORDER_BASIS_FIRST,
    ORDER_COEFF_FIRST,
    SparseIPConv,
    SparseLinear,
    choose_order,
    ip_conv,
    sparse_coefficients,
    sparse_linear,
)

__all__ = [
    "ORDER_AUTO",
    "ORDER_BASIS_FIRST",
    "ORDER_COEFF_FIRST",
    "SparseIPConv",
    "SparseLinear",
    "choose_order",
    "ip_conv",
    "sparse_coefficients",
    "sparse_linear",
]
