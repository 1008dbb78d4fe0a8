"""The support of a DCLS kernel (``dcls_mm.ops.kernel.support_radius``) and the depthwise
layer's crop to it: outside the centre square of radius r the kernel is 0 and passes no
gradient, so convolving with only that square changes no output and no gradient."""
import math

import pytest
import torch

from dcls_mm.ops import Dcls2d, construct_kernel
from dcls_mm.ops.kernel import GAUSSIAN_CUT, support_radius

SIZES = (17, 17)


def _params(C, K, positions, seed):
    """Weights with exact zeros, positions drawn as asked with some made integer (a
    bilinear element then has a zero-weight tap that still gets a gradient), widths in
    [-0.8, 0.8]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 1, K, generator=g)
    w[:, :, ::5] = 0.0
    if positions == 'near':  # the published initialisation: N(0, 0.5)
        P = 0.5 * torch.randn(2, C, 1, K, generator=g)
    elif positions == 'corner':  # one quadrant only, some outside the grid
        P = torch.rand(2, C, 1, K, generator=g) * 4 + 3
    else:
        P = (torch.rand(2, C, 1, K, generator=g) * 2 - 1) * 8
    P[:, :, :, 1::4] = P[:, :, :, 1::4].round()
    SIG = torch.rand(2, C, 1, K, generator=g) * 1.6 - 0.8
    return w, P, SIG


def _centre_mask(r, sizes):
    rows = (torch.arange(sizes[0]) - sizes[0] // 2).abs() <= r
    cols = (torch.arange(sizes[1]) - sizes[1] // 2).abs() <= r
    return rows[:, None] & cols[None, :]


@pytest.mark.parametrize('interpolation', ['bilinear', 'bilinear_normalized', 'triangle',
                                           'gaussian'])
@pytest.mark.parametrize('positions', ['near', 'corner', 'spread'])
def test_kernel_and_gradients_vanish_outside_the_radius(route, interpolation, positions):
    if interpolation == 'bilinear_normalized' and route == 'torch':
        pytest.skip('bilinear_normalized has one construction (scatter)')
    w, P, SIG = _params(24, 10, positions, seed=1)
    sig = SIG if interpolation in ('triangle', 'gaussian') else None
    r = support_radius(P, sig, SIZES, interpolation)
    assert 0 <= r <= 8
    inputs = [t.clone().requires_grad_() for t in (w, P) + ((SIG,) if sig is not None else ())]
    kernel = construct_kernel(inputs[0], inputs[1], inputs[2] if sig is not None else None,
                              SIZES, interpolation)
    inside = _centre_mask(r, SIZES)
    assert kernel.detach()[..., ~inside].abs().sum() == 0
    grad = torch.randn_like(kernel)
    full = torch.autograd.grad(kernel, inputs, grad, retain_graph=True)
    cropped = torch.autograd.grad(kernel, inputs, grad * inside, retain_graph=True)
    for a, b in zip(cropped, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if 0 < r < 8 and interpolation != 'gaussian':
        # tight for the piecewise-linear profiles: the square's edge passes a gradient
        smaller = torch.autograd.grad(kernel, inputs, grad * _centre_mask(r - 1, SIZES))
        assert any(not torch.equal(a, b) for a, b in zip(smaller, full))


def test_radius_by_hand():
    C, K = 3, 4
    w = torch.ones(C, 1, K)
    # bilinear: taps floor(p) and floor(p) + 1
    P = torch.full((2, C, 1, K), 0.3)
    assert support_radius(P, None, SIZES, 'bilinear') == 1
    P[1, 0, 0, 0] = -2.5  # taps -3 and -2
    assert support_radius(P, None, SIZES, 'bilinear') == 3
    P[0, 1, 0, 2] = 20.0  # far outside: the whole kernel
    assert support_radius(P, None, SIZES, 'bilinear') == 8
    # triangle of width |SIG| + 1 at 0.25: the taps with |i - 0.25| < 1, i.e. 0 and 1
    P, SIG = torch.full((2, C, 1, K), 0.25), torch.zeros(2, C, 1, K)
    assert support_radius(P, SIG, SIZES, 'triangle') == 1
    SIG[0, 2, 0, 1] = -1.5  # width 2.5: taps -2..2
    assert support_radius(P, SIG, SIZES, 'triangle') == 2
    P = torch.zeros(2, C, 1, K)
    # gaussian of width 0.5 at 0 (SIG 0.23): |i| <= 0.5 G + 1/2, G = 6.76
    SIG = torch.full((2, C, 1, K), 0.23)
    G = math.sqrt(2 * math.log(2 / (GAUSSIAN_CUT * 2.0 ** -23)))
    assert support_radius(P, SIG, SIZES, 'gaussian') == math.ceil(0.5 * G + 0.5) == 4
    kernel = construct_kernel(w, P, SIG, SIZES, 'gaussian')
    assert kernel[..., ~_centre_mask(4, SIZES)].abs().max() == 0
    with pytest.raises(ValueError, match='unknown interpolation'):
        support_radius(P, SIG, SIZES, 'cubic')


def _plain_twin(fast):
    plain = Dcls2d(fast.in_channels, fast.out_channels, fast.kernel_count,
                   padding=fast.padding[0][0], dilated_kernel_size=fast.dilated_kernel_size,
                   groups=fast.groups, interpolation=fast.interpolation, impl='plain')
    plain.load_state_dict(fast.state_dict())
    return plain


def _run(m, x):
    xi = x.clone().requires_grad_()
    y = m(xi)
    params = [m.weight, m.P, m.bias] + ([m.SIG] if m.SIG is not None else [])
    return (y, *torch.autograd.grad(y.square().sum(), [xi, *params]))


@pytest.mark.parametrize('interpolation', ['bilinear', 'triangle', 'gaussian'])
@pytest.mark.parametrize('padding', [8, 3])
def test_layer_convolves_with_the_centre_square_only(route, interpolation, padding):
    torch.manual_seed(0)
    fast = Dcls2d(32, 32, 8, padding=padding, dilated_kernel_size=17, groups=32,
                  interpolation=interpolation)  # positions from N(0, 0.5)
    x = torch.randn(2, 32, 20, 20)
    r = support_radius(fast.P, fast.SIG, fast.dilated_kernel_size, interpolation)
    assert r < 8
    window = fast.kernel_window(x)
    # the square around tap 8, but never cutting into the padding: with padding 3 the
    # window keeps 3 taps beyond the input's first/last row (output size unchanged)
    start = min(max(8 - r, 0), padding)
    stop = max(min(8 + r + 1, 17), 17 - padding)
    assert window == ((start, stop), (start, stop))
    assert all(p >= 0 for pair in fast.window_padding(window) for p in pair)
    for a, b in zip(_run(fast, x), _run(_plain_twin(fast), x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_spread_positions_use_the_whole_kernel():
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 8, padding=8, dilated_kernel_size=17, groups=16,
               interpolation='bilinear')
    with torch.no_grad():
        m.P.uniform_(-8, 8)
    assert m.kernel_window(torch.randn(1, 16, 20, 20)) is None


def test_no_crop_while_compiling(monkeypatch):
    """Under torch.compile / export the window would be frozen into the graph while the
    positions move: only the map's own crop (static in the shapes) is taken."""
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 8, padding=8, dilated_kernel_size=17, groups=16,
               interpolation='bilinear')
    x = torch.randn(1, 16, 20, 20)
    assert m.kernel_window(x) is not None
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert m.kernel_window(x) is None


def test_bfloat16_parameters_keep_the_tap_their_rounding_would_lose():
    """|p| + |SIG| = 3.0 + 0.005 rounds to 3.0 in bfloat16, but the float32 construction
    reaches the tap at distance 4 (width 1.005 around 3): the radius is computed in
    float64 (found by review)."""
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 4, padding=8, dilated_kernel_size=17, groups=16,
               interpolation='triangle')
    with torch.no_grad():
        m.P.zero_()
        m.SIG.zero_()
        m.P[0, 0, 0, 0] = 3.0
        m.SIG[0, 0, 0, 0] = 0.005
    plain = _plain_twin(m).bfloat16()
    m = m.bfloat16()
    assert support_radius(m.P, m.SIG, m.dilated_kernel_size, 'triangle') == 4
    x = torch.randn(2, 16, 20, 20).bfloat16()
    for a, b in zip(_run(m, x), _run(plain, x)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_positions_keep_the_whole_kernel(value):
    P = torch.zeros(2, 3, 1, 4)
    P[1, 2, 0, 3] = value
    SIG = torch.zeros(2, 3, 1, 4)
    for interpolation in ('bilinear', 'triangle', 'gaussian'):
        assert support_radius(P, SIG, SIZES, interpolation) == 8


def test_traced_graphs_do_not_freeze_a_window():
    """make_fx (proxy mode) and AOT autograd trace the layer: the crop, which reads the
    positions, is skipped, so the graph stays right after the positions move."""
    from functorch.compile import aot_module, nop
    from torch.fx.experimental.proxy_tensor import make_fx
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 8, padding=8, dilated_kernel_size=17, groups=16,
               interpolation='bilinear')
    x = torch.randn(1, 16, 20, 20)
    assert m.kernel_window(x) is not None
    graph = make_fx(lambda t: m(t))(x)
    aot = aot_module(m, nop)
    torch.testing.assert_close(graph(x), m(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.P.uniform_(-8, 8)  # now the kernel spans the grid
    for f in (graph, aot):
        torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)
