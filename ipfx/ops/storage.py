"""Sparse storage of a coefficient tensor, and the per-storage cache of the matrices built from it.

Storage
-------
For a convolution weight ``W`` of shape ``weight_shape = (w0, w1, k_1, ..., k_d)`` let ``K = k_1 * ... * k_d``.
The kernel is kept as a coefficient tensor ``C`` of shape ``(w0, w1, K)`` and a basis ``B`` of shape ``(K, K)``
(row ``j`` is the basis filter ``F_j`` flattened in C order; ``None`` means the identity, the spatial basis):

    W = reshape(C @ B, weight_shape)

``C`` is stored sparsely: ``values`` (nnz,) and ``indices`` (nnz,) int32/int64, flat indices into
``C.reshape(-1)``. Repeated indices are summed (``C.view(-1).index_add_(0, indices, values)``).

* ordinary conv: ``weight_shape = (c_out, c_in/groups, *k)``, so ``C[o, il, j]`` couples output channel ``o``
  with input channel ``i = (o // (c_out/groups)) * (c_in/groups) + il``;
* transposed conv: ``weight_shape = (c_in, c_out/groups, *k)``, so ``C[i, ol, j]`` couples input channel ``i``
  with output channel ``o = (i // (c_in/groups)) * (c_out/groups) + ol``.

:func:`_coupling` maps flat indices to these ``(o, i, j)`` triples.
"""

from __future__ import annotations

import contextlib

import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor

from ..form.compose import compose_weight

_INT32_MAX = 2**31 - 1


def sparse_coefficients(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Nonzeros of ``dense`` as ``(values, indices)``: ``dense.reshape(-1)[indices] == values``.

    Indices are ascending, int32 when ``dense.numel()`` fits in int32 (compact storage), else int64.
    """
    flat = dense.detach().reshape(-1)
    idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
    values = flat[idx].clone()
    index_dtype = torch.int32 if flat.numel() <= _INT32_MAX else torch.int64
    return values, idx.to(index_dtype)


def _densify(values: Tensor, indices: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`sparse_coefficients` (repeated indices summed)."""
    flat = values.new_zeros(numel)
    return flat.index_add_(0, indices.to(device=values.device, dtype=torch.int64), values)


def _folded_csr(g: dict, values: Tensor, flat: Tensor, basis: Optional[Tensor], dtype: torch.dtype,
                device) -> tuple[Tensor, Tensor, Tensor]:
    """The folded kernel ``W = C @ B`` (the basis folded into the coefficients; ``B`` the identity where
    ``basis`` is None) as a CSR matrix over output channels: int64 row pointers, int64 columns ``i*K + t``
    (``i`` the input channel, ``t`` the tap), values in ``dtype``; a row's columns ascending. A coupled pair
    (o, i) with a basis has all ``K`` taps (those whose folded number is exactly 0 left out); a pair without a
    kept coefficient has none. Computed in ``dtype`` on ``device``, not cached (the callers cache it)."""
    K = g["K"]
    w0, w1 = g["weight_shape"][:2]
    c = _densify(values.to(device=device, dtype=dtype), flat.to(device), w0 * w1 * K).reshape(w0, w1, K)
    b = None if basis is None else basis.to(device=device, dtype=dtype)
    w = compose_weight(c, None, b, (w0, w1, K), b is not None).reshape(-1)
    nz = torch.nonzero(w).reshape(-1)
    o, i, t = _coupling(g, nz)  # W is (w0, w1, K) like C, its last index the tap
    col = i * K + t
    order = torch.argsort(o * (g["c_in"] * K) + col)
    crow = torch.zeros(g["c_out"] + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(torch.bincount(o, minlength=g["c_out"]), 0)
    return crow, col[order].contiguous(), w[nz][order].contiguous()


def _coupling(g: dict, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Map flat indices into C = (w0, w1, K) to (output channel o, input channel i, basis index j)."""
    K = g["K"]
    w1 = g["weight_shape"][1]
    j = flat % K
    r = flat // K
    a, b = r // w1, r % w1
    if g["transposed"]:  # C[i, ol, j]
        cin_g = g["c_in"] // g["groups"]
        i = a
        o = (a // cin_g) * w1 + b
    else:  # C[o, il, j]
        cout_g = g["c_out"] // g["groups"]
        o = a
        i = (a // cout_g) * w1 + b
    return o, i, j


# Sparse matrices built from (values, indices), cached per storage tensor: a deployed module calls the op
# with the same buffers every time, so the matrix is built (and its format converted) once, not per call.
# Keyed weakly on the ``indices`` tensor; the entry also records the identity and version counters of both
# tensors, so an in-place change or a different ``values`` tensor rebuilds it.
_MATRICES: dict[int, tuple["weakref.ref[Tensor]", dict]] = {}  # id(indices) -> (weak ref, matrices)


class _HeldData:
    """Where a tensor's data lives, and that data held: equal to another where the address is. Kept in a cache
    key, it keeps the data it names alive, so no later allocation takes its address while the key is kept (a
    swap ``t.data = torch.empty(0)`` then ``t.data = new`` often got the freed block back: the key matched, the
    old numbers were used)."""

    __slots__ = ("address", "storage")

    def __init__(self, t: Tensor):
        self.address = t.data_ptr()
        self.storage = t.untyped_storage()

    def __eq__(self, other) -> bool:
        return isinstance(other, _HeldData) and other.address == self.address

    def __hash__(self) -> int:
        return hash(self.address)


def tensor_state(t: Optional[Tensor]):
    """What is kept from ``t`` (a plan, a folded kernel, a CSR) depends on: the tensor, its in-place version and
    its data (:class:`_HeldData`). The data catches ``t.data = other``, which swaps the data and counts no version
    (kept on the version alone, a lowered model went on computing with the old numbers, silently). An edit in
    place through ``t.data`` (``t.data.mul_(2)``) changes none of the three and is not followed: edit under
    ``torch.no_grad()`` (``t.mul_(2)``) or with ``load_state_dict``."""
    if t is None:
        return None
    try:
        data = _HeldData(t)
    except (RuntimeError, NotImplementedError):  # no storage (fake or functional tensors)
        data = None
    return id(t), t._version, data


def _storage_entry(indices: Tensor) -> dict:
    """The cache dict of one sparse storage (keyed weakly on its ``indices`` tensor)."""
    ref, entry = _MATRICES.get(id(indices), (None, None))
    if ref is None or ref() is not indices:  # new storage, or an old id reused by another tensor
        entry = {}
        try:
            _MATRICES[id(indices)] = (weakref.ref(indices), entry)
            weakref.finalize(indices, _MATRICES.pop, id(indices), None)
        except TypeError:  # cannot be weakly referenced (some tensor subclasses): no caching
            pass
    return entry


def built_without_autocast(build):
    """``build()`` with autocast off (CPU, and CUDA where there is one). What is kept per storage (folded
    kernels, matrices, plans) must not depend on whether the call that made it ran under autocast: a basis fold
    ``C @ B`` made under CPU bfloat16 autocast came out bfloat16 and was kept, and every later call of that
    module failed, with autocast or without ("values must have x's dtype")."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        return build()


def _cached(entry: dict, which: str, key: tuple, build):
    """``entry[which]`` if it was built for ``key``, else ``build()`` (replacing the stale one; autocast off:
    :func:`built_without_autocast`)."""
    hit = entry.get(which)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = built_without_autocast(build)
    entry[which] = (key, value)
    return value


def _sparse_matrix(values: Tensor, indices: Tensor, which: str, shape: tuple[int, int], coords, like: Tensor) -> Tensor:
    """The sparse ``shape`` matrix with ``values`` at ``coords() = (rows, cols)`` (duplicates summed).

    CSR where torch has a CSR @ dense kernel for the dtype and device (measured 1.5-5x faster than COO on
    CPU for ResNet-sized layers), else coalesced COO.
    """

    def build():
        rows, cols = coords()
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values.to(dtype=like.dtype, device=like.device),
                                      shape, check_invariants=False).coalesce()
        if like.dtype in (torch.float32, torch.float64) or like.device.type == "cuda":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                return coo.to_sparse_csr()
        return coo

    key = (shape, tensor_state(values), tensor_state(indices), like.dtype, like.device)
    return _cached(_storage_entry(indices), which, key, build)
