"""The Triton bilinear construction (GPU route ``construct=triton``), run by Triton's CPU
interpreter against the PyTorch scatter formula and its autograd gradients."""
import pytest
import torch

from dcls_mm.ops import triton_conv
from dcls_mm.ops.kernel import construction_route
from tests._helpers import run_interpreted

pytestmark = pytest.mark.skipif(triton_conv.triton is None, reason='triton is not installed')


def test_ops_match_the_scatter_formula_and_its_gradients():
    out = run_interpreted('''
        import torch
        from dcls_mm.ops import triton_construct as tc
        from dcls_mm.ops.kernel import _bilinear_kernel, _slice_window
        torch.manual_seed(0)
        B, K, L0, L1 = 37, 9, 9, 8
        w = torch.randn(B, K, requires_grad=True)
        P = torch.rand(2, B, K) * 14 - 7  # some beyond the clamp bounds [-5, 5], [-5, 4]
        P[0, 0, :4] = torch.tensor([-5.0, 5.0, 1.0, -2.5])  # on the bounds, integer
        P = P.requires_grad_(True)
        for (r0, r1), (c0, c1) in [((0, L0), (0, L1)), ((2, 7), (1, 5))]:
            want = _slice_window(_bilinear_kernel(w, P, (L0, L1), False), ((r0, r1), (c0, c1)))
            got = tc.bilinear_kernel(w.detach(), P.detach(), L0, L1, r0, r1 - r0, c0, c1 - c0)
            assert got.shape == want.shape == (B, r1 - r0, c1 - c0)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            g = torch.randn(want.shape)
            dw_want, dp_want = torch.autograd.grad(want, (w, P), g)
            dw, dp = tc.bilinear_kernel_backward(g, w.detach(), P.detach(), L0, L1, r0, r1 - r0,
                                                 c0, c1 - c0)
            torch.testing.assert_close(dw, dw_want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dp, dp_want, rtol=1e-5, atol=1e-6)
            assert (dp == 0).any() and (dp != 0).any()  # clamped positions pass nothing
        print('ok')
    ''')
    assert out.strip() == 'ok'


def test_dcls_layer_through_the_triton_construction_equals_the_compiled_one():
    out = run_interpreted('''
        import os, torch
        from dcls_mm.ops import Dcls2d
        from dcls_mm.ops.kernel import construction_route
        torch.manual_seed(0)
        layer = Dcls2d(24, 24, 7, padding='same', dilated_kernel_size=9, groups=24,
                       interpolation='bilinear')
        x = torch.randn(2, 24, 10, 11)
        grad = torch.randn(2, 24, 10, 11)
        results = {}
        for route in ('triton', 'compiled'):
            # conv=onednn: the interpreted Triton forward would be measured too (slow)
            os.environ['DCLS_MM_ROUTES'] = f'construct={route},conv=onednn'
            assert construction_route('bilinear', 2, layer.P, None) == route
            layer.zero_grad()
            xi = x.clone().requires_grad_(True)
            layer(xi).backward(grad)
            results[route] = [xi.grad, layer.weight.grad, layer.P.grad]
        for a, b in zip(results['triton'], results['compiled']):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        print('ok')
    ''')
    assert out.strip() == 'ok'


def test_route_only_on_gpus_unless_forced(monkeypatch):
    P = torch.zeros(2, 4, 1, 3)
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    assert construction_route('bilinear', 2, P, None) != 'triton'
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert construction_route('bilinear', 2, P, None) != 'triton'
    monkeypatch.setenv('DCLS_MM_ROUTES', 'construct=triton')
    assert construction_route('bilinear', 2, P, None) == 'triton'
    assert construction_route('bilinear', 2, P.double(), None) != 'triton'  # float32 only


def test_separable_ops_match_the_einsum_formula_and_its_gradients():
    """Triangle and gaussian (with its cut, whose taps pass no gradient), full kernel and
    a window, against PyTorch's einsum formula and autograd."""
    out = run_interpreted('''
        import torch
        from dcls_mm.ops import triton_construct as tc
        from dcls_mm.ops.kernel import _separable_kernel_torch
        torch.manual_seed(0)
        cases = [(7, 5, 9, 8, ((0, 9), (0, 8))), (5, 26, 23, 23, ((5, 18), (3, 20)))]
        for interpolation in ('gaussian', 'triangle'):
            for B, K, L0, L1, window in cases:
                w = torch.randn(B, K, requires_grad=True)
                P = (torch.rand(2, B, K) * (L0 - 1) - (L0 - 1) / 2).requires_grad_(True)
                SIG = (torch.randn(2, B, K) * 0.5).requires_grad_(True)
                grids = [torch.arange(L, dtype=torch.float32) for L in (L0, L1)]
                want = _separable_kernel_torch(w, P, SIG, (L0, L1), interpolation, grids,
                                               window)
                (r0, r1), (c0, c1) = window
                args = (L0, L1, interpolation, r0, r1 - r0, c0, c1 - c0)
                got = tc.separable_kernel(w.detach(), P.detach(), SIG.detach(), *args)
                assert got.shape == want.shape == (B, r1 - r0, c1 - c0)
                assert torch.equal(got == 0, want == 0) and (want == 0).any()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                g = torch.randn(want.shape)
                grads = tc.separable_kernel_backward(g, w.detach(), P.detach(), SIG.detach(),
                                                     *args, got)
                for a, b in zip(grads, torch.autograd.grad(want, (w, P, SIG), g)):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        print('ok')
    ''')
    assert out.strip() == 'ok'


def test_separable_route_is_opt_in(monkeypatch):
    """Not measured on a GPU yet: triangle/gaussian take the Triton construction only
    when forced, and a forced layer equals the compiled one."""
    P = torch.zeros(2, 4, 1, 3)
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    assert construction_route('gaussian', 2, P, P) == 'compiled'
    monkeypatch.setenv('DCLS_MM_ROUTES', 'construct=triton')
    assert construction_route('gaussian', 2, P, P) == 'triton'
    assert construction_route('triangle', 2, P, P) == 'triton'
    out = run_interpreted('''
        import os, torch
        from dcls_mm.ops import Dcls2d
        torch.manual_seed(0)
        layer = Dcls2d(16, 16, 6, padding='same', dilated_kernel_size=11, groups=16)
        x, grad = torch.randn(2, 16, 9, 9), torch.randn(2, 16, 9, 9)
        results = {}
        for route in ('triton', 'compiled'):
            # conv=onednn: the interpreted Triton forward would be measured too (slow)
            os.environ['DCLS_MM_ROUTES'] = f'construct={route},conv=onednn'
            layer.zero_grad()
            xi = x.clone().requires_grad_(True)
            layer(xi).backward(grad)
            results[route] = [xi.grad] + [p.grad for p in layer.parameters()]
        for a, b in zip(results['triton'], results['compiled']):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        print('ok')
    ''')
    assert out.strip() == 'ok'


def test_deterministic_mode_keeps_the_scatter_on_gpus(monkeypatch):
    """The Triton bilinear forward sums taps with atomics: not taken when PyTorch is
    asked for deterministic algorithms (its scatter_add then is deterministic)."""
    from dcls_mm.ops import triton_construct
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    monkeypatch.setattr(triton_construct, 'available', lambda P: True)
    P = torch.zeros(2, 4, 1, 3, device='meta')  # stands in for a GPU tensor
    assert construction_route('bilinear', 2, P, None) == 'triton'
    torch.use_deterministic_algorithms(True)
    try:
        assert construction_route('bilinear', 2, P, None) == 'scatter'
    finally:
        torch.use_deterministic_algorithms(False)
