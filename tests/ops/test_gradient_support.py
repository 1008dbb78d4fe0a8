"""dcls_mm.ops.kernel.gradient_support: the taps whose gradient the kernel construction
reads (a convolution may leave its kernel gradient 0 elsewhere)."""
import pytest
import torch

from dcls_mm.ops import extension
from dcls_mm.ops.kernel import construct_kernel, gradient_support

pytestmark = pytest.mark.skipif(not extension.available(), reason='compiled kernels not built')

SIZES = (11, 9)


def _elements(trial, interpolation, g):
    C, K = 6, 5
    weight = torch.randn(C, 1, K, generator=g)
    if trial % 3 == 0:
        weight[:, :, 0] = 0  # zero weights still read their taps' gradient (for P)
    P = (torch.rand(2, C, 1, K, generator=g) - 0.5) * torch.tensor(
        [SIZES[0] + 4.0, SIZES[1] + 4.0]).view(2, 1, 1, 1)  # some outside the grid
    if trial % 4 == 1:
        P = P.round()  # integer positions: a tap with value 0 and a live derivative
    SIG = torch.rand(2, C, 1, K, generator=g) * 2 if interpolation == 'triangle' else None
    return weight, P, SIG


@pytest.mark.parametrize('interpolation', ['bilinear', 'bilinear_normalized', 'triangle'])
@pytest.mark.parametrize('window', [None, ((2, 9), (1, 7))])
def test_masked_kernel_gradient_gives_the_same_parameter_gradients(interpolation, window):
    """The gradients of weight, P (and SIG) from a kernel gradient masked to the support
    are bit-identical to those from the whole kernel gradient; no non-zero tap lies
    outside the support (both construction routes)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        weight, P, SIG = _elements(trial, interpolation, g)
        support = gradient_support(P, SIG, SIZES, interpolation, window)
        for route in ('compiled', 'torch'):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv('DCLS_MM_ROUTES', f'construct={route}')
                ins = [t.clone().requires_grad_() for t in (weight, P, SIG) if t is not None]
                kernel = construct_kernel(ins[0], ins[1], ins[2] if SIG is not None else None,
                                          SIZES, interpolation, window=window)
            assert support.shape == kernel.shape and support.dtype == torch.bool
            assert not ((kernel != 0) & ~support).any()
            grad = torch.randn(kernel.shape, generator=g)
            full = torch.autograd.grad(kernel, ins, grad, retain_graph=True)
            masked = torch.autograd.grad(kernel, ins, grad * support)
            for a, b in zip(full, masked):
                assert torch.equal(a, b), (trial, route)


def test_bilinear_support_by_hand():
    """Two elements of one channel: the 2x2 taps at floor(p) and floor(p) + 1 of each
    (centred positions, grid index p + L // 2), clipped to the grid; nothing else."""
    P = torch.tensor([[[[-2.25, 5.5]]], [[[0.0, -4.75]]]])  # (2, C=1, 1, K=2)
    support = gradient_support(P, None, (11, 9), 'bilinear')
    expected = torch.zeros(1, 1, 11, 9, dtype=torch.bool)
    expected[0, 0, 2:4, 4:6] = True      # rows 5 - 2.25 = 2.75 -> 2, 3; cols 4 + 0 -> 4, 5
    expected[0, 0, 10, 0] = True         # row 10.5 -> 10 (11 is off the grid); col -0.75 -> 0
    assert torch.equal(support, expected)


def test_triangle_support_by_hand():
    """|i - p| < w = |SIG| + 1 along each dim (plus a 1e-3 margin): a rectangle."""
    P = torch.tensor([[[[0.5]]], [[[-1.0]]]])
    SIG = torch.tensor([[[[0.2]]], [[[1.0]]]])
    support = gradient_support(P, SIG, (7, 7), 'triangle')
    expected = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    # rows: p = 3.5, w = 1.2 -> 2.3 < i < 4.7 -> 3, 4; cols: p = 2, w = 2 -> |j - 2| <= 2
    # (j = 0 and 4 sit within the margin of the edge) -> 0..4
    expected[0, 0, 3:5, 0:5] = True
    assert torch.equal(support, expected)


def test_every_tap_when_no_rule_applies():
    """Gaussian, float64 positions: no support (every tap); a non-finite position or
    width: every tap of that channel, the others keep their rule."""
    P = torch.zeros(2, 4, 1, 3)
    assert gradient_support(P, torch.ones_like(P), (9, 9), 'gaussian') is None
    assert gradient_support(P.double(), None, (9, 9), 'bilinear') is None
    bad = P.clone()
    bad[0, 1, 0, 2] = float('nan')
    support = gradient_support(bad, None, (9, 9), 'bilinear')
    assert support[1].all() and support.sum() == 81 + 3 * 4
    SIG = torch.zeros_like(P)
    SIG[1, 2, 0, 0] = float('inf')
    support = gradient_support(P, SIG, (9, 9), 'triangle', ((2, 7), (3, 9)))
    assert support.shape == (4, 1, 5, 6) and support[2].all() and support.sum() == 30 + 3 * 9  # rows, cols 3-5


def test_huge_finite_positions_and_widths():
    """A diverged triangle element (|p| or SIG of 1e20) has no tap in the window, or every
    row/column (huge width); no crash from the integer conversion."""
    P, SIG = torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 1, 1)
    P[0, 0], P[1, 1] = 1e20, -1e20
    SIG[0, 2] = 1e19
    support = gradient_support(P, SIG, (5, 5), 'triangle', ((1, 5), (0, 4)))
    assert support.shape == (3, 1, 4, 4)
    assert not support[0].any() and not support[1].any()
    # channel 2: every row (the width), columns |j - 2| <= 1.001
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:, 1:4] = True
    assert torch.equal(support[2, 0], expected)


def _bilinear_layer():
    from dcls_mm.ops import Dcls2d
    torch.manual_seed(0)
    return Dcls2d(16, 16, 3, padding=3, dilated_kernel_size=7, groups=16)


def test_user_kernel_gets_its_whole_gradient(monkeypatch):
    """Dcls2d.conv with a kernel that is not the layer's construction: exact gradient on
    every tap, even with the sparse kernel gradient forced (no support is attached)."""
    import torch.nn.functional as F
    monkeypatch.setenv('DCLS_MM_ROUTES', 'kernel_grad=sparse')
    m = _bilinear_layer()
    x = torch.randn(2, 16, 10, 10)
    k = torch.randn(16, 1, 7, 7, requires_grad=True)
    m.conv(x, k).square().sum().backward()
    k_ref = k.detach().clone().requires_grad_()
    F.conv2d(x, k_ref, m.bias.detach(), 1, 3, 1, 16).square().sum().backward()
    torch.testing.assert_close(k.grad, k_ref.grad, rtol=1e-4, atol=1e-3)
    assert (k.grad != 0).all()


def test_support_uses_the_positions_of_the_forward(monkeypatch):
    """Frozen positions changed in place between forward and backward (nothing saved
    them in the scatter construction): the weight gradient is the one of the forward's
    positions."""
    monkeypatch.setenv('DCLS_MM_ROUTES', 'kernel_grad=sparse')
    from dcls_mm.ops import Dcls2d
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 3, padding=3, dilated_kernel_size=7, groups=16,
               interpolation='bilinear_normalized')
    m.P.requires_grad_(False)
    x = torch.randn(2, 16, 10, 10)
    m(x).square().sum().backward()
    expected = m.weight.grad.clone()
    m.weight.grad = None
    y = m(x).square().sum()
    with torch.no_grad():
        m.P.add_(2.0)
    y.backward()
    torch.testing.assert_close(m.weight.grad, expected)
