"""The slow references of tests/ops/dense_reference.py agree with each other, so that
the tests comparing the package against either of them compare against the method."""
import pytest
import torch

from .dense_reference import reference_gauss_axis_kernel, reference_kernel


@pytest.mark.parametrize('dks', [5, (7, 7)])
def test_reference_package_gauss_is_the_method_with_swapped_axes(dks):
    """On a square grid the reference package's column-first gauss kernel is the
    element-by-element method kernel of the row-first positions (P and SIG flipped)."""
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 4, dtype=torch.float64)
    P = torch.randn(2, 3, 2, 4, dtype=torch.float64)
    SIG = torch.rand(2, 3, 2, 4, dtype=torch.float64)
    n = dks if isinstance(dks, int) else dks[0]
    got = reference_gauss_axis_kernel(weight, P, SIG, dks)
    assert got.shape == (3, 2, n, n)
    expected = reference_kernel(weight, P.flip(0), SIG.flip(0), (n, n), 'gauss')
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # without the swap the two differ: the check can tell the axes apart
    assert not torch.allclose(got, reference_kernel(weight, P, SIG, (n, n), 'gauss'))


def test_reference_package_gauss_non_square_centres():
    """One element at P = 0 on a 5 (rows) x 3 (cols) grid: the reference package centres
    the column coordinate with dks[0] // 2 = 2 and the row coordinate with dks[1] // 2 = 1,
    so the peak sits at row 1, column 2."""
    weight = torch.ones(1, 1, 1, dtype=torch.float64)
    zeros = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    kernel = reference_gauss_axis_kernel(weight, zeros, zeros, (5, 3))[0, 0]
    assert kernel.shape == (5, 3)
    assert divmod(int(kernel.argmax()), 3) == (1, 2)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
