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
                                                    0, 5, 0, 5, torch.empty(0))


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
torch.save(dict(isa=extension.isa(), capability=torch.backends.cpu.get_cpu_capability(),
                out=out.detach(), grads=[t.grad for t in ins], kg=kg, kg15=kg15, conv=conv,
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
    # the CPU's own capability, as a process without the variable sees it (this one may
    # itself run with ATEN_CPU_CAPABILITY set)
    cpu = results[None]['capability']
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
    with_kept = backward(grad, w, P, SIG, kept, 23, 23, code, *window, torch.empty(0))
    evaluated = backward(grad, w, P, SIG, torch.empty(0), 23, 23, code, *window, torch.empty(0))
    for a, b in zip(with_kept, evaluated):
        assert torch.equal(a, b)
    # given the kernel, the gradient is ignored where it is 0 (the gaussian cut; triangle
    # zeros in these layers too)
    masked = backward(grad, w, P, SIG, kept, 23, 23, code, *window, out)
    by_hand = backward(grad.masked_fill(out == 0, 0.0), w, P, SIG, kept, 23, 23, code, *window,
                       torch.empty(0))
    for a, b in zip(masked, by_hand):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match='kept profiles must be what separable_kernel '
                                           r'returned for these inputs \(float32 \(3, 19968\)\)'):
        backward(grad, w, P, SIG, kept[:2], 23, 23, code, *window, torch.empty(0))
    with pytest.raises(RuntimeError, match="out must be the forward's float32 kernel"):
        backward(grad, w, P, SIG, kept, 23, 23, code, *window, out[:, :1])


def gaussian_cut_reference(weight, P, SIG, sizes):
    """The cut of GAUSSIAN_CUT for float32, from the float64 profiles, element by element:
    2^-32 * sum_k |w_k / (S0 S1 + eps)| max_i a0[k, i] max_j a1[k, j] (at least tiny)."""
    out = torch.zeros(weight.shape[:-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in weight.shape[:-1]]).view(
            -1, weight.dim() - 1):
        idx = tuple(idx.tolist())
        total = 0.0
        for k in range(weight.shape[-1]):
            profiles = []
            for d, L in enumerate(sizes):
                width = abs(float(SIG[(d, *idx, k)])) + 0.27
                pos = float(P[(d, *idx, k)]) + L // 2
                profiles.append([torch.tensor(-0.5 * ((i - pos) / width) ** 2).exp().item()
                                 for i in range(L)])
            scale = float(weight[(*idx, k)]) / (sum(profiles[0]) * sum(profiles[1]) + 1e-7)
            total += abs(scale) * max(profiles[0]) * max(profiles[1])
        out[idx] = max(total * 2.0 ** -32, torch.finfo(torch.float32).tiny)
    return out


@pytest.mark.parametrize('forced', ['', 'construct=torch'])
def test_gaussian_tails_below_the_cut_are_zero_and_pass_no_gradient(monkeypatch, forced):
    """Gaussian tails (1e-20..1e-38 at the initial width) multiply with small activations
    or gradients into subnormal floats, which made the convolution 4-6x slower; both
    constructions set the taps below GAUSSIAN_CUT of the channel's bound to 0, keep every
    other value, and give the cut taps no gradient."""
    monkeypatch.setenv('DCLS_MM_ROUTES', forced)
    torch.manual_seed(0)
    m = Dcls2d(20, 20, 26, dilated_kernel_size=23, padding='same', groups=20,
               interpolation='gaussian')  # initial width 0.5: tails of 1e-20 per dim
    kernel = m.construct_kernel()
    w64, P64, S64 = (t.detach().double() for t in (m.weight, m.P, m.SIG))
    exact = dense_formula(w64, P64, S64, (23, 23), 'gaussian')
    cut = gaussian_cut_reference(w64, P64, S64, (23, 23))[..., None, None]
    below = exact.abs() < cut
    assert ((exact != 0) & below).sum() > 5000  # most of the initial kernel is tail
    value = kernel.detach().double()
    assert (value[exact.abs() < 0.99 * cut] == 0).all()
    assert ((value == 0) | (value.abs() >= 0.99 * cut)).all()
    kept = exact.abs() >= 1.01 * cut
    torch.testing.assert_close(value[kept], exact[kept], rtol=1e-4, atol=1e-7)
    # gradient: the float64 formula with the same taps cut (the borderline ones aside)
    grad = torch.randn(kernel.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(kernel, [m.weight, m.P, m.SIG], grad)
    ref_in = [t.clone().requires_grad_() for t in (w64, P64, S64)]
    ref = dense_formula(*ref_in, (23, 23), 'gaussian').masked_fill(below, 0.0)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-5)
    # a gradient on the cut taps only reaches nothing (the uncut formula passes some on)
    on_cut = grad.masked_fill(~(exact.abs() < 0.99 * cut), 0.0)
    got = torch.autograd.grad(m.construct_kernel(), [m.weight, m.P, m.SIG], on_cut)
    assert all((g == 0).all() for g in got)
    uncut = torch.autograd.grad(dense_formula(*ref_in, (23, 23), 'gaussian'), ref_in,
                                on_cut.double())
    assert all(g.abs().max() > 0 for g in uncut)

@pytest.mark.parametrize('interpolation', ['gaussian', 'triangle'])
@pytest.mark.parametrize('bad', ['P', 'SIG'])
def test_a_nan_position_or_width_gives_a_nan_kernel(route, interpolation, bad):
    """A diverged element shows up as NaN, on either route (the compiled triangle once
    dropped it: `d > 0 ? d : 0` is 0 for NaN, while relu keeps NaN)."""
    w, P, SIG = (t.float() for t in make((3, 1), 4, (7, 7)))
    {'P': P, 'SIG': SIG}[bad][0, 1, 0, 2] = float('nan')
    kernel = construct_kernel(w, P, SIG, (7, 7), interpolation)
    assert kernel[1].isnan().any()
    assert not kernel[[0, 2]].isnan().any()  # the other channels are untouched
