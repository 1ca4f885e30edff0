import math

import pytest
import torch
from hypothesis import given, strategies as st

from ipfx.form.bases import (
    coefficients_in_basis,
    dct_1d,
    dct_basis,
    make_basis,
    random_orthogonal_basis,
    spatial_basis,
)
from ipfx.errors import IPFXValueError, SingularBasisError

kernel_sizes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


def test_dct_1d_matches_the_textbook_formula():
    n = 3
    d = dct_1d(n)
    # row 0 is constant 1/sqrt(n); row 1 is sqrt(2/n) cos(pi (2m+1) / (2n))
    assert torch.allclose(d[0], torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64))
    expected = [math.sqrt(2 / n) * math.cos(math.pi * (2 * m + 1) / (2 * n)) for m in range(n)]
    assert torch.allclose(d[1], torch.tensor(expected, dtype=torch.float64))


@given(kernel_sizes)
def test_dct_basis_is_orthonormal_and_separable(kernel_size):
    b = dct_basis(kernel_size)
    K = math.prod(kernel_size)
    assert b.shape == (K, K)
    assert torch.allclose(b @ b.T, torch.eye(K, dtype=b.dtype), atol=1e-12)
    # row (j_1, ..., j_d), reshaped to the kernel, is the outer product of the 1-d rows
    ones = (0,) * len(kernel_size)
    last = tuple(k - 1 for k in kernel_size)
    for multi in {ones, last}:
        flat = 0
        for j, k in zip(multi, kernel_size):
            flat = flat * k + j
        outer = torch.ones((), dtype=torch.float64)
        for j, k in zip(multi, kernel_size):
            outer = torch.tensordot(outer, dct_1d(k)[j], dims=0)
        assert torch.allclose(b[flat].reshape(kernel_size), outer.to(b.dtype), atol=1e-12)


@given(kernel_sizes, st.integers(0, 2**16))
def test_random_basis_is_orthogonal_and_seeded(kernel_size, seed):
    b1 = random_orthogonal_basis(kernel_size, generator=torch.Generator().manual_seed(seed))
    b2 = random_orthogonal_basis(kernel_size, generator=torch.Generator().manual_seed(seed))
    K = math.prod(kernel_size)
    assert torch.equal(b1, b2)
    assert torch.allclose(b1 @ b1.T, torch.eye(K, dtype=b1.dtype), atol=1e-10)


@given(kernel_sizes, st.sampled_from(["dct", "spatial", "random"]))
def test_coefficients_round_trip(kernel_size, name):
    K = math.prod(kernel_size)
    basis = make_basis(name, kernel_size, dtype=torch.float64)
    w = torch.randn(3, 2, K, dtype=torch.float64)
    coeff = coefficients_in_basis(w, basis)
    assert torch.allclose(coeff @ basis, w, atol=1e-10)


def test_spatial_basis_is_identity_so_coefficients_are_the_weights():
    w = torch.randn(2, 2, 9, dtype=torch.float64)
    assert torch.equal(coefficients_in_basis(w, spatial_basis((3, 3))), w)


def test_non_orthogonal_invertible_basis_round_trips():
    g = torch.Generator().manual_seed(1)
    basis = torch.eye(9, dtype=torch.float64) + 0.3 * torch.randn(9, 9, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 9, dtype=torch.float64)
    assert torch.allclose(coefficients_in_basis(w, make_basis(basis, (3, 3), dtype=torch.float64)) @ basis, w)


def test_callable_basis():
    b = make_basis(lambda ks: 2 * torch.eye(math.prod(ks)), (3, 3))
    assert torch.equal(b, 2 * torch.eye(9))


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(9, 9), "singular"),
        (torch.ones(9, 9), "singular"),
        (torch.full((9, 9), float("nan")), "NaN"),
    ],
)
def test_singular_basis_is_refused(bad, message):
    with pytest.raises(SingularBasisError, match=message):
        make_basis(bad, (3, 3), where="conv1.weight")


def test_bad_basis_specs():
    with pytest.raises(IPFXValueError, match="unknown basis 'haar'"):
        make_basis("haar", (3, 3))
    with pytest.raises(IPFXValueError, match=r"\(9, 9\)"):
        make_basis(torch.eye(4), (3, 3))
    with pytest.raises(IPFXValueError, match="must return"):
        make_basis(lambda ks: "nope", (3, 3))
