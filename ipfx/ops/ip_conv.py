"""Fused interspace-pruning (IP) inference ops: a convolution whose kernel is stored as sparse coefficients.

This module is the historical import path; the code lives in modules by concern:

* :mod:`ipfx.ops.storage`  - the sparse storage format ``W = reshape(C @ B, weight_shape)``, ``C`` as
  ``(values, indices)``, and the per-storage matrix cache;
* :mod:`ipfx.ops.geometry` - argument checks and output sizes;
* :mod:`ipfx.ops.kernels`  - the evaluation orders (the algebra: conv is linear in its kernel);
* :mod:`ipfx.ops.order`    - which order runs (the cost model);
* :mod:`ipfx.ops.native`   - the tiled C++ kernel (``csrc/ip_conv.cpp``), built on first use;
* :mod:`ipfx.ops.library`  - the ``torch.library`` custom ops ``ipfx::ip_conv``, ``ipfx::sparse_linear``;
* :mod:`ipfx.ops.modules`  - :class:`SparseIPConv`, :class:`SparseLinear`.

Every name importable from here before the split still is.
"""

from __future__ import annotations

from .geometry import (  # noqa: F401
    IntSeq,
    _check_index_range,
    _check_linear,
    _check_sparse_storage,
    _conv_geometry,
    _identity_unfold_applies,
    _output_spatial,
    _per_dim,
    _tuple,
)
from .kernels import (  # noqa: F401
    _CONV,
    _CONV_T,
    _basis_maps,
    _basis_or_identity,
    _conv_kwargs,
    _filter_bank,
    _order_a,
    _order_b,
    _order_dense,
    _spmm,
)
from .library import _INFERENCE_ONLY, _run_ip_conv, ip_conv, sparse_linear  # noqa: F401
from .modules import SparseIPConv, SparseLinear, _as_bias, _eager_inference, _SparseStorageMixin  # noqa: F401
from .order import (  # noqa: F401
    _RUNNERS,
    ORDER_AUTO,
    ORDER_BASIS_FIRST,
    ORDER_COEFF_FIRST,
    ORDER_DENSE,
    ORDER_NATIVE,
    ORDER_TUNED,
    _candidates,
    _measured_order,
    choose_order,
    cost_terms,
    order_costs,
)
from .storage import (  # noqa: F401
    _INT32_MAX,
    _MATRICES,
    _cached,
    _coupling,
    _densify,
    _sparse_matrix,
    _storage_entry,
    sparse_coefficients,
)

__all__ = [
    "ORDER_AUTO",
    "ORDER_BASIS_FIRST",
    "ORDER_COEFF_FIRST",
    "ORDER_DENSE",
    "ORDER_NATIVE",
    "ORDER_TUNED",
    "ip_conv",
    "sparse_linear",
    "choose_order",
    "sparse_coefficients",
    "SparseIPConv",
    "SparseLinear",
]
