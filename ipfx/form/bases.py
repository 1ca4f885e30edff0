"""Filter bases: the ``B`` in ``W = reshape((mask * coeff) @ B, W.shape)``.

A basis for kernels of spatial size ``kernel_size = (k_1, ..., k_d)`` is a ``(K, K)`` matrix with
``K = k_1 * ... * k_d``; row ``j`` is the basis filter ``F_j`` flattened in C order, i.e. in the same
order as ``weight.reshape(c_out, c_in_per_group, K)``.

* ``"spatial"`` is the identity: coefficients are the kernel entries themselves (standard pruning, SP).
* ``"dct"`` is the orthonormal DCT-II basis, the tensor (Kronecker) product of the 1-d DCT-II bases of
  each kernel dimension. Row ``(j_1, ..., j_d)`` of ``kron(D_1, ..., D_d)`` is the outer product of the
  1-d rows, flattened in C order, which matches the weight's flattening.
* ``"random"`` is a random orthogonal matrix (QR of a Gaussian matrix, signs fixed so the law is Haar).

Any invertible ``(K, K)`` tensor, or a callable ``kernel_size -> tensor``, is accepted too. Expressing a
weight in a basis is ``coeff = W_flat @ inverse(B)``; :func:`coefficients_in_basis` does this with a
linear solve and refuses singular or badly conditioned bases.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from ..errors import IPFXValueError, SingularBasisError

BasisSpec = Union[str, torch.Tensor, Callable[[Sequence[int]], torch.Tensor]]

#: Names accepted as ``basis=`` by :func:`ipfx.transform`.
BASIS_NAMES = ("dct", "spatial", "random")

# A basis whose condition number exceeds this cannot round-trip float32 weights to within ~1e-3.
_MAX_CONDITION = 1e4


def kernel_numel(kernel_size: Sequence[int]) -> int:
    """``K = k_1 * ... * k_d``."""
    return math.prod(int(k) for k in kernel_size)


def dct_1d(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix of size ``n``: ``D[k, m] = c_k cos(pi (2m + 1) k / (2n))``.

    ``c_0 = sqrt(1/n)`` and ``c_k = sqrt(2/n)`` otherwise, which makes ``D @ D.T = I``.
    """
    m = torch.arange(n, dtype=torch.float64)
    k = m[:, None]
    d = torch.cos(math.pi * (2 * m[None, :] + 1) * k / (2 * n))
    d[0] *= math.sqrt(1.0 / n)
    d[1:] *= math.sqrt(2.0 / n)
    return d.to(dtype)


def dct_basis(kernel_size: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal d-dimensional DCT-II filter basis, ``kron(D_{k_1}, ..., D_{k_d})``."""
    basis = torch.ones(1, 1, dtype=torch.float64)
    for k in kernel_size:
        basis = torch.kron(basis, dct_1d(int(k)))
    return basis.to(dtype)


def spatial_basis(kernel_size: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The identity: basis filter ``j`` is the unit kernel with a one at flat position ``j``."""
    return torch.eye(kernel_numel(kernel_size), dtype=dtype)


def random_orthogonal_basis(
    kernel_size: Sequence[int],
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A Haar-random orthogonal ``(K, K)`` matrix: ``Q`` of ``QR(G)`` with ``diag(R) > 0``."""
    n = kernel_numel(kernel_size)
    g = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype)


def make_basis(
    spec: BasisSpec,
    kernel_size: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    where: str = "",
) -> torch.Tensor:
    """Build the ``(K, K)`` basis named by ``spec`` for kernels of spatial size ``kernel_size``.

    ``where`` names the layer in error messages.
    """
    n = kernel_numel(kernel_size)
    if isinstance(spec, str):
        if spec == "dct":
            basis = dct_basis(kernel_size)
        elif spec == "spatial":
            basis = spatial_basis(kernel_size)
        elif spec == "random":
            basis = random_orthogonal_basis(kernel_size, generator=generator)
        else:
            raise IPFXValueError(
                f"unknown basis {spec!r}; use one of {', '.join(map(repr, BASIS_NAMES))}, "
                "a (K, K) tensor, or a callable kernel_size -> (K, K) tensor"
            )
    elif isinstance(spec, torch.Tensor):
        basis = spec.detach()
    elif callable(spec):
        basis = spec(tuple(int(k) for k in kernel_size))
        if not isinstance(basis, torch.Tensor):
            raise IPFXValueError(
                f"basis callable returned {type(basis).__name__} for kernel size {tuple(kernel_size)}"
                f"{_at(where)}; it must return a ({n}, {n}) tensor"
            )
        basis = basis.detach()
    else:
        raise IPFXValueError(
            f"basis must be a name ({', '.join(map(repr, BASIS_NAMES))}), a tensor or a callable, "
            f"not {type(spec).__name__}"
        )
    if tuple(basis.shape) != (n, n):
        raise IPFXValueError(
            f"basis for kernel size {tuple(kernel_size)}{_at(where)} has shape {tuple(basis.shape)}; "
            f"it must be (K, K) = ({n}, {n})"
        )
    check_invertible(basis, where=where)
    return basis.to(device=device, dtype=dtype).clone()


def check_invertible(basis: torch.Tensor, *, where: str = "") -> None:
    """Raise :class:`SingularBasisError` unless ``basis`` is well-conditioned enough to invert."""
    b = basis.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(b).all():
        raise SingularBasisError(f"basis{_at(where)} contains NaN or inf; pass a finite invertible basis")
    sv = torch.linalg.svdvals(b)
    if sv.numel() == 0 or sv[-1] <= sv[0] * (1.0 / _MAX_CONDITION):
        rank = int((sv > sv[0] * 1e-12).sum()) if sv.numel() else 0
        raise SingularBasisError(
            f"basis{_at(where)} is singular or badly conditioned (rank {rank} of {b.shape[0]}, "
            f"condition number {float(sv[0] / sv[-1]) if sv[-1] > 0 else float('inf'):.3g}); "
            "weights cannot be expressed in it. Pass an invertible basis, e.g. 'dct' or 'spatial'."
        )


def coefficients_in_basis(weight_flat: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Solve ``coeff @ basis = weight_flat`` for ``coeff`` (last dim K), in float64 for accuracy.

    ``coeff @ B = W  <=>  B^T coeff^T = W^T``, a linear solve against ``B^T``.
    """
    w = weight_flat.detach().to(torch.float64)
    b = basis.detach().to(device=w.device, dtype=torch.float64)
    k = b.shape[0]
    rows = w.reshape(-1, k)
    coeff = torch.linalg.solve(b.T, rows.T).T
    return coeff.reshape(w.shape).to(weight_flat.dtype)


def _at(where: str) -> str:
    return f" of {where}" if where else ""
