"""Building only a window of a DCLS kernel (``construct_kernel(..., window=...)``) and the
depthwise layer that uses it on maps smaller than the kernel: the taps and every gradient
equal the same slice of the full kernel (which tests/ops/test_separable_kernel.py checks
against a dense formula)."""
import pytest
import torch

from dcls_mm.ops import Dcls2d, construct_kernel, extension


def _params(C, K, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 1, K, generator=g)
    P = (torch.rand(2, C, 1, K, generator=g) * 2 - 1) * torch.tensor(
        [L // 2 for L in sizes], dtype=torch.float32).view(2, 1, 1, 1)
    SIG = torch.rand(2, C, 1, K, generator=g) * 1.6 - 0.8
    return [t.requires_grad_() for t in (w, P, SIG)]


@pytest.mark.parametrize('interpolation', ['gaussian', 'triangle', 'bilinear',
                                           'bilinear_normalized'])
@pytest.mark.parametrize('C,K,sizes,window', [
    (37, 5, (17, 17), ((2, 15), (2, 15))),   # the 13x13 taps a 7x7 map meets
    (20, 26, (23, 23), ((5, 18), (0, 23))),  # rows only
    (3, 4, (9, 7), ((0, 1), (6, 7))),        # one corner tap
    (16, 3, (7, 9), ((3, 7), (1, 8))),       # odd offsets, one full block
])
def test_window_equals_slice_of_full_kernel(route, interpolation, C, K, sizes, window):
    if interpolation == 'bilinear_normalized' and route == 'torch':
        pytest.skip('bilinear_normalized has one construction (scatter)')
    w, P, SIG = _params(C, K, sizes)
    sig = SIG if interpolation in ('gaussian', 'triangle') else None
    (r0, r1), (c0, c1) = window
    full = construct_kernel(w, P, sig, sizes, interpolation)[..., r0:r1, c0:c1]
    part = construct_kernel(w, P, sig, sizes, interpolation, window=window)
    assert part.shape == (C, 1, r1 - r0, c1 - c0)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(part)
    inputs = [w, P] + ([SIG] if sig is not None else [])
    ref = torch.autograd.grad(full, inputs, grad)
    got = torch.autograd.grad(part, inputs, grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_window_outside_kernel_is_refused():
    w, P, SIG = _params(4, 3, (7, 7))
    with pytest.raises(ValueError, match=r'window must be 2 \(start, stop\) pairs inside'):
        construct_kernel(w, P, SIG, (7, 7), 'gaussian', window=((0, 8), (0, 7)))
    with pytest.raises(ValueError, match='window must be 2'):
        construct_kernel(w, P, SIG, (7, 7), 'gaussian', window=((3, 3), (0, 7)))


def test_compiled_op_rejects_window_outside_kernel():
    assert extension.available()
    w, P, S = torch.randn(4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match=r'window rows \[3, 8\) x columns \[0, 5\) must lie inside'):
        torch.ops.dcls_mm.separable_kernel(w, P, S, 5, 5, 1, 3, 5, 0, 5)
    with pytest.raises(RuntimeError, match=r'grad must be float32 \(B, nr, nc\)'):
        torch.ops.dcls_mm.separable_kernel_backward(torch.randn(4, 5, 4), w, P, S, torch.empty(0), 5, 5, 1,
                                                    0, 5, 0, 5, torch.empty(0))


@pytest.mark.parametrize('interpolation', ['gaussian', 'triangle', 'bilinear'])
def test_dcls2d_builds_only_the_taps_a_small_map_meets(route, interpolation):
    torch.manual_seed(0)
    fast = Dcls2d(24, 24, 6, padding=8, dilated_kernel_size=17, groups=24,
                  interpolation=interpolation)
    with torch.no_grad():
        fast.P.uniform_(-8, 8)  # spread over the whole kernel, as after training
    plain = Dcls2d(24, 24, 6, padding=8, dilated_kernel_size=17, groups=24,
                   interpolation=interpolation, impl='plain')
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 24, 5, 5)
    # hand count: output row y reads input rows y + i - 8 for tap i; y, rows in [0, 5)
    # -> taps 4..12 meet the input
    assert fast.kernel_window(x) == ((4, 13), (4, 13))
    assert fast.kernel_window(torch.randn(2, 24, 9, 9)) is None  # 2 * 9 - 1 >= 17
    assert plain.kernel_window(x) is None
    assert fast.construct_kernel(fast.kernel_window(x)).shape == (24, 1, 9, 9)
    results = []
    for m in (fast, plain):
        xi = x.clone().requires_grad_()
        y = m(xi)
        params = [m.weight, m.P, m.bias] + ([m.SIG] if m.SIG is not None else [])
        results.append((y, *torch.autograd.grad(y.square().sum(), [xi, *params])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inference_memo_follows_the_window():
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 4, padding=8, dilated_kernel_size=17, groups=16).eval()
    small, large = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        for x in (small, large, small):
            expect = torch.nn.functional.conv2d(x, m.construct_kernel(), m.bias, padding=8,
                                                groups=16)
            torch.testing.assert_close(m(x), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('hw', [(5, 5), (6, 4)])
def test_strided_window_equals_plain_path(route, hw):
    torch.manual_seed(0)
    fast = Dcls2d(16, 16, 5, stride=2, padding=8, dilated_kernel_size=17, groups=16,
                  interpolation='gaussian')
    with torch.no_grad():
        fast.P.uniform_(-8, 8)
    plain = Dcls2d(16, 16, 5, stride=2, padding=8, dilated_kernel_size=17, groups=16,
                   interpolation='gaussian', impl='plain')
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 16, *hw)
    assert fast.kernel_window(x) is not None
    results = []
    for m in (fast, plain):
        xi = x.clone().requires_grad_()
        y = m(xi)
        results.append((y, *torch.autograd.grad(y.square().sum(), [xi, m.weight, m.P, m.SIG])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
