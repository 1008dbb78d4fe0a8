"""Triangle/gaussian kernel construction: the compiled CPU op (forward and backward) and
the PyTorch einsum fallback against a dense float64 formula written here."""
import pytest
import torch

from dcls_mm.ops import Dcls2d, construct_kernel, extension
from dcls_mm.ops import kernel as kernel_module

OFFSET = {'triangle': 1.0, 'gaussian': 0.27}


def dense_formula(weight, P, SIG, sizes, interpolation):
    """Every element evaluated on the full (L0, L1) grid, then normalised by its own sum
    (no separability), float64, differentiable."""
    L0, L1 = sizes
    i = torch.arange(L0, dtype=torch.float64).view(L0, 1)
    j = torch.arange(L1, dtype=torch.float64).view(1, L1)
    u = i - (P[0] + L0 // 2)[..., None, None]            # (..., K, L0, 1)
    v = j - (P[1] + L1 // 2)[..., None, None]            # (..., K, 1, L1)
    s0 = (SIG[0].abs() + OFFSET[interpolation])[..., None, None]
    s1 = (SIG[1].abs() + OFFSET[interpolation])[..., None, None]
    if interpolation == 'gaussian':
        grid = torch.exp(-0.5 * ((u / s0) ** 2 + (v / s1) ** 2))
    else:
        grid = torch.relu(s0 - u.abs()) * torch.relu(s1 - v.abs())
    grid = grid / (grid.sum((-2, -1), keepdim=True) + 1e-7)
    return (weight[..., None, None] * grid).sum(-3)


def make(shape, K, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, K, generator=g, dtype=torch.float64)
    P = (torch.rand(2, *shape, K, generator=g, dtype=torch.float64) * 2 - 1)
    P = P * torch.tensor([L // 2 for L in sizes], dtype=torch.float64).view(2, *[1] * (len(shape) + 1))
    SIG = torch.rand(2, *shape, K, generator=g, dtype=torch.float64) * 1.6 - 0.8
    flat_P, flat_S = P.view(2, -1), SIG.view(2, -1)
    flat_P[:, :3] = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, -2.0]])  # grid points: kinks
    flat_S[:, :2] = 0.0                                                  # |SIG| kink
    return w, P, SIG


CASES = [
    ((37, 1), 5, (7, 6)),    # two full channel blocks + a partial one, even/non-square
    ((3, 2), 4, (5, 9)),     # not depthwise: 6 (out, in) pairs, one partial block
    ((20, 1), 26, (23, 23)),  # the gaussian ConvNeXt's dks 23, K 26
]


@pytest.mark.parametrize('interpolation', ['gaussian', 'triangle'])
@pytest.mark.parametrize('shape,K,sizes', CASES)
def test_forward_and_gradients_match_dense_formula(route, monkeypatch, interpolation, shape, K,
                                                    sizes):
    used = []
    real = kernel_module._separable_kernel_torch
    monkeypatch.setattr(kernel_module, '_separable_kernel_torch',
                        lambda *a: used.append('torch') or real(*a))
    w, P, SIG = make(shape, K, sizes)
    ref_in = [t.clone().requires_grad_() for t in (w, P, SIG)]
    ref = dense_formula(*ref_in, sizes, interpolation)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(grad)
    ins = [t.float().requires_grad_() for t in (w, P, SIG)]
    out = construct_kernel(*ins, sizes, interpolation)
    out.backward(grad.float())
    assert used == ([] if route == 'compiled' else ['torch'])
    assert out.shape == (*shape, *sizes) and out.dtype == torch.float32
    scale = ref.abs().max()
    torch.testing.assert_close(out.double() / scale, ref.detach() / scale, rtol=0, atol=2e-6)
    for name, a, b in zip(('weight', 'P', 'SIG'), ins, ref_in):
        s = b.grad.abs().max()
        torch.testing.assert_close(a.grad.double() / s, b.grad / s, rtol=0, atol=2e-5,
                                   msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('interpolation', ['gaussian', 'triangle'])
def test_second_order_gradients_through_compiled_construction(monkeypatch, interpolation):
    """backward(create_graph=True) through the compiled op equals the PyTorch path."""
    assert extension.available()
    w, P, SIG = make((5, 1), 3, (7, 7), seed=2)
    results = []
    for forced in ('', 'construct=torch'):
        monkeypatch.setenv('DCLS_MM_ROUTES', forced)
        ins = [t.float().requires_grad_() for t in (w, P, SIG)]
        out = construct_kernel(*ins, (7, 7), interpolation)
        first = torch.autograd.grad(out.square().sum(), ins, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        results.append(torch.autograd.grad(penalty, ins))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gaussian_dcls2d_layer_same_on_both_routes(monkeypatch):
    torch.manual_seed(0)
    m = Dcls2d(24, 24, 6, dilated_kernel_size=9, padding='same', groups=24, interpolation='gauss')
    x = torch.randn(2, 24, 10, 10, requires_grad=True)
    results = []
    for forced in ('', 'construct=torch'):
        monkeypatch.setenv('DCLS_MM_ROUTES', forced)
        y = m(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, m.weight, m.P, m.SIG])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_op_rejects_bad_input():
    assert extension.available()
    op = torch.ops.dcls_mm.separable_kernel
    w, P, S = torch.randn(4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match='float32 tensors expected'):
        op(w.double(), P.double(), S.double(), 5, 5, 1, 0, 5, 0, 5)
    with pytest.raises(RuntimeError, match=r'weight must be \(B, K\) and P, SIG \(2, B, K\)'):
        op(w, P[:, :3], S, 5, 5, 1, 0, 5, 0, 5)
    with pytest.raises(RuntimeError, match='interpolation must be 0'):
        op(w, P, S, 5, 5, 7, 0, 5, 0, 5)
    with pytest.raises(RuntimeError, match=r'grad must be float32 \(B, nr, nc\)'):
        torch.ops.dcls_mm.separable_kernel_backward(torch.randn(4, 5, 4), w, P, S, torch.empty(0), 5, 5, 1,
                                                    0, 5, 0, 5)


ISA_SCRIPT = '''
import sys, torch
from dcls_mm.ops import extension
from dcls_mm.ops.kernel import construct_kernel
g = torch.Generator().manual_seed(0)
w, P, S = (torch.randn(2, 37, 1, 5, generator=g)[0], torch.randn(2, 37, 1, 5, generator=g) * 3,
           torch.randn(2, 37, 1, 5, generator=g))
ins = [t.requires_grad_() for t in (w, P, S)]
out = construct_kernel(*ins, (9, 8), 'gaussian')
out.backward(torch.randn(out.shape, generator=g))
x, gy = torch.randn(2, 37, 9, 9, generator=g), torch.randn(2, 37, 9, 9, generator=g)
kg = torch.ops.dcls_mm.depthwise_kernel_grad(x, gy, 9, 9, 4, 4, 1, 1)
# 15 taps / 15 columns: every tile size of the register-tiled loops (8 + 4 + 2 + 1)
x2, g2 = torch.randn(2, 32, 12, 21, generator=g), torch.randn(2, 32, 12, 11, generator=g)
kg15 = torch.ops.dcls_mm.depthwise_kernel_grad(x2, g2, 7, 15, 3, 7, 1, 2)
cx, ck, cb = (torch.randn(2, 32, 6, 15, generator=g), torch.randn(32, 1, 3, 5, generator=g),
              torch.randn(32, generator=g))
conv = torch.ops.dcls_mm.depthwise_conv(cx, ck, cb, 1, 1, 2, 2)
# bilinear from values computed in Python (torch.randn's last bit follows the capability)
import math
bw = torch.tensor([math.sin(0.7 * i) for i in range(185)]).view(37, 1, 5).requires_grad_()
bP = torch.tensor([[math.sin(1.3 * i) * 5.5 for i in range(185)],
                   [math.cos(2.1 * i) * 5.5 for i in range(185)]]).view(2, 37, 1, 5).requires_grad_()
bil = construct_kernel(bw, bP, None, (9, 8), 'bilinear')
bil.backward(torch.tensor([math.cos(0.3 * i) for i in range(bil.numel())]).view(bil.shape))
torch.save(dict(isa=extension.isa(), out=out.detach(), grads=[t.grad for t in ins], kg=kg,
                kg15=kg15, conv=conv,
                bil=bil.detach(), bil_grads=[bw.grad, bP.grad]), sys.argv[1])
'''


def test_compiled_copy_follows_aten_capability(tmp_path):
    """ATEN_CPU_CAPABILITY=avx2 (how an AVX2 machine is emulated) switches the compiled
    kernels to their x86-64-v3 copy, never to one the CPU lacks; the numbers agree."""
    import os
    import subprocess
    import sys
    results = {}
    for cap in ('default', 'avx2', None):
        env = {k: v for k, v in os.environ.items() if k != 'ATEN_CPU_CAPABILITY'}
        if cap:
            env['ATEN_CPU_CAPABILITY'] = cap
        path = tmp_path / f'{cap}.pt'
        proc = subprocess.run([sys.executable, '-c', ISA_SCRIPT, str(path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[cap] = torch.load(path)
    assert results['default']['isa'] == 'baseline'
    cpu = torch.backends.cpu.get_cpu_capability()
    expected = {'AVX512': 'x86-64-v4', 'AVX2': 'x86-64-v3'}.get(cpu, 'baseline')
    assert results[None]['isa'] == expected
    assert results['avx2']['isa'] == ('x86-64-v3' if expected != 'baseline' else 'baseline')
    for cap in ('default', 'avx2'):
        torch.testing.assert_close(results[cap]['out'], results[None]['out'], rtol=1e-5, atol=1e-6)
        for a, b in zip(results[cap]['grads'], results[None]['grads']):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for name in ('kg', 'kg15', 'conv'):
            torch.testing.assert_close(results[cap][name], results[None][name], rtol=1e-5,
                                       atol=1e-4)
        assert torch.equal(results[cap]['bil'], results[None]['bil'])  # same additions
        for a, b in zip(results[cap]['bil_grads'], results[None]['bil_grads']):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('interpolation,code', [('gaussian', 1), ('triangle', 0)])
@pytest.mark.parametrize('window', [(0, 23, 0, 23), (5, 13, 4, 13)])
def test_backward_with_kept_profiles_equals_backward_that_evaluates_them(interpolation, code,
                                                                         window):
    """The forward hands its profiles to the backward (keep_profiles); the gradients are
    the same numbers as when the backward evaluates them itself (an empty tensor)."""
    assert extension.available()
    w, P, SIG = (t.float() for t in make((37,), 26, (23, 23)))
    op = torch.ops.dcls_mm.separable_kernel
    out, kept = op(w, P, SIG, 23, 23, code, *window, keep_profiles=True)
    plain, none = op(w, P, SIG, 23, 23, code, *window)
    assert torch.equal(out, plain) and none.numel() == 0
    assert kept.shape == (3, (26 * 46 + 2 * 26) * 16)  # 37 channels: 3 blocks of 16
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    backward = torch.ops.dcls_mm.separable_kernel_backward
    with_kept = backward(grad, w, P, SIG, kept, 23, 23, code, *window)
    evaluated = backward(grad, w, P, SIG, torch.empty(0), 23, 23, code, *window)
    for a, b in zip(with_kept, evaluated):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match='kept profiles must be what separable_kernel '
                                           r'returned for these inputs \(float32 \(3, 19968\)\)'):
        backward(grad, w, P, SIG, kept[:2], 23, 23, code, *window)


@pytest.mark.parametrize('forced', ['', 'construct=torch'])
def test_gaussian_kernel_has_no_subnormal_values(monkeypatch, forced):
    """Gaussian tails multiply into subnormal floats (a convolution with them ran ~3x
    slower on the CPU); both constructions flush values below finfo.tiny to zero and
    keep every other value."""
    monkeypatch.setenv('DCLS_MM_ROUTES', forced)
    torch.manual_seed(0)
    m = Dcls2d(32, 32, 26, dilated_kernel_size=23, padding='same', groups=32,
               interpolation='gaussian')  # initial width 0.5: tails of 1e-20 per dim
    kernel = m.construct_kernel().detach()
    tiny = torch.finfo(torch.float32).tiny
    exact = dense_formula(m.weight.double(), m.P.double(), m.SIG.double(), (23, 23),
                          'gaussian')
    assert ((exact != 0) & (exact.abs() < tiny)).sum() > 1000  # the tails are there
    assert not ((kernel != 0) & (kernel.abs() < tiny)).any()
    kept = exact.abs() >= 2 * tiny
    torch.testing.assert_close(kernel.double()[kept], exact[kept], rtol=1e-4, atol=1e-6)
    assert (kernel[exact.abs() < tiny / 2] == 0).all()
