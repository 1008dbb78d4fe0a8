"""Bilinear kernel construction: the compiled CPU op (forward and backward) against the
PyTorch scatter formula (forced with ``DCLS_MM_ROUTES=construct=torch``) and against the
element-by-element reference of tests/ops/dense_reference.py."""
import pytest
import torch

from dcls_mm.ops import Dcls2d, construct_kernel, extension
from dcls_mm.ops.kernel import construction_route

from .dense_reference import reference_kernel


def _params(C, K, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 1, K, generator=g)
    # a little beyond the clamp range on both sides, so that clamped elements occur
    P = (torch.rand(2, C, 1, K, generator=g) * 2 - 1) * torch.tensor(
        [L // 2 + 2 for L in sizes], dtype=torch.float32).view(2, 1, 1, 1)
    flat = P.view(2, -1)
    lo0, hi0 = -1 - sizes[0] // 2, sizes[0] - sizes[0] // 2
    # integer positions (one-sided gradient), both clamp bounds exactly, and beyond them
    flat[:, :6] = torch.tensor([[0.0, 2.0, lo0, hi0, lo0 - 0.5, -1.0],
                                [1.0, 0.0, -2.0, 1.5, 0.25, hi0 + 3.0]])
    return w, P


def _build(monkeypatch, forced, w, P, sizes, window, grad):
    monkeypatch.setenv('DCLS_MM_ROUTES', forced)
    ws, Ps = w.clone().requires_grad_(), P.clone().requires_grad_()
    out = construct_kernel(ws, Ps, None, sizes, 'bilinear', window=window)
    out.backward(grad)
    return out.detach(), ws.grad, Ps.grad


@pytest.mark.parametrize('C,K,sizes,window', [
    (37, 34, (17, 17), None),                   # two full channel blocks + a partial one
    (37, 34, (17, 17), ((2, 15), (2, 15))),     # the 13x13 taps a 7x7 map meets
    (5, 7, (9, 6), ((0, 1), (5, 6))),           # non-square, one corner tap
    (16, 3, (7, 9), ((3, 7), (1, 8))),          # one full block, odd offsets
])
def test_compiled_op_equals_scatter_formula(monkeypatch, C, K, sizes, window):
    assert extension.available()
    w, P = _params(C, K, sizes)
    (r0, r1), (c0, c1) = window or ((0, sizes[0]), (0, sizes[1]))
    grad = torch.randn(C, 1, r1 - r0, c1 - c0, generator=torch.Generator().manual_seed(1))
    compiled = _build(monkeypatch, '', w, P, sizes, window, grad)
    scatter = _build(monkeypatch, 'construct=torch', w, P, sizes, window, grad)
    # same taps added in the same order: the same bits
    assert torch.equal(compiled[0], scatter[0])
    for name, a, b in zip(('weight', 'P'), compiled[1:], scatter[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f'{name}: {m}')
    if C * K > 200:
        return  # the element-by-element reference is slow; the small cases check it
    # and the taps are the element-by-element definition (float64, full grid) at the
    # clamped positions
    lo = torch.tensor([-1 - L // 2 for L in sizes]).view(2, 1, 1, 1)
    hi = torch.tensor([L - L // 2 for L in sizes]).view(2, 1, 1, 1)
    ref = reference_kernel(w, torch.maximum(torch.minimum(P, hi), lo), None, sizes,
                           'v0')[..., r0:r1, c0:c1]
    torch.testing.assert_close(compiled[0].double(), ref, rtol=1e-5, atol=1e-6)


def test_positions_at_clamp_bounds_and_outside_get_the_scatter_formula_gradient(monkeypatch):
    """Hand-checked: an element at an integer position has a one-sided position gradient
    (the tap after it), one beyond the clamp range has none."""
    w = torch.tensor([[[2.0, 3.0]]])                  # one channel, K = 2
    P = torch.tensor([[[[0.0, 9.0]]], [[[0.0, 0.0]]]])  # element 1 clamped along dim 0
    grad = torch.zeros(1, 1, 5, 5)
    grad[0, 0, 2, 2], grad[0, 0, 3, 2] = 1.0, 5.0     # centre tap and the one below it
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    ws, Ps = w.clone().requires_grad_(), P.clone().requires_grad_()
    kernel = construct_kernel(ws, Ps, None, (5, 5), 'bilinear')
    kernel.backward(grad)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 2, 2] = 2.0                        # element 1 lies off the grid
    assert torch.equal(kernel.detach(), expected)
    assert ws.grad.tolist() == [[[1.0, 0.0]]]
    # d/dP0 of element 0: w * (grad below - grad at) = 2 * (5 - 1); element 1: clamped
    assert Ps.grad[0].flatten().tolist() == [8.0, 0.0]


def test_second_order_gradients_through_compiled_construction(monkeypatch):
    w, P = _params(5, 3, (7, 7), seed=2)
    results = []
    for forced in ('', 'construct=torch'):
        monkeypatch.setenv('DCLS_MM_ROUTES', forced)
        ins = [w.clone().requires_grad_(), P.clone().requires_grad_()]
        out = construct_kernel(*ins, None, (7, 7), 'bilinear', window=((1, 6), (0, 7)))
        first = torch.autograd.grad(out.square().sum(), ins, create_graph=True)
        results.append(torch.autograd.grad(sum(g.square().sum() for g in first), ins))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_routes(monkeypatch):
    assert extension.available()
    m = Dcls2d(4, 4, 3, dilated_kernel_size=7, padding='same', groups=4, interpolation='bilinear')
    assert construction_route('bilinear', 2, m.P, None) == 'compiled'
    assert construction_route('bilinear', 2, m.P.double(), None) == 'scatter'
    assert construction_route('bilinear', 1, m.P, None) == 'scatter'
    assert construction_route('bilinear_normalized', 2, m.P, None) == 'scatter'
    monkeypatch.setenv('DCLS_MM_ROUTES', 'construct=torch')
    assert construction_route('bilinear', 2, m.P, None) == 'scatter'


def test_op_rejects_bad_input():
    assert extension.available()
    op, backward = torch.ops.dcls_mm.bilinear_kernel, torch.ops.dcls_mm.bilinear_kernel_backward
    w, P = torch.randn(4, 3), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match='float32 tensors expected'):
        op(w.double(), P.double(), 5, 5, 0, 5, 0, 5)
    with pytest.raises(RuntimeError, match=r'weight must be \(B, K\) and P \(2, B, K\)'):
        op(w, P[:, :3], 5, 5, 0, 5, 0, 5)
    with pytest.raises(RuntimeError, match=r'window rows \[3, 8\) x columns \[0, 5\) must lie'):
        op(w, P, 5, 5, 3, 5, 0, 5)
    with pytest.raises(RuntimeError, match=r'grad must be float32 \(B, nr, nc\)'):
        backward(torch.randn(4, 5, 4), w, P, 5, 5, 0, 5, 0, 5)
    bad = P.clone()
    bad[1, 2, 0] = float('nan')
    with pytest.raises(RuntimeError, match='the positions P contain NaN'):
        op(w, bad, 5, 5, 0, 5, 0, 5)
    with pytest.raises(RuntimeError, match='the positions P contain NaN'):
        backward(torch.randn(4, 5, 5), w, bad, 5, 5, 0, 5, 0, 5)
