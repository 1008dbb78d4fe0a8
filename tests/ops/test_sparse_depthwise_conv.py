"""The compiled stride-1 depthwise forward over each channel's non-zero taps
(``dcls_mm::sparse_depthwise_conv``, candidate ``sparse`` of the measured route ``conv``)
against ``F.conv2d`` on an explicitly padded input, and the kernel gradient over a
support (``dcls_mm::sparse_depthwise_kernel_grad``, candidate ``sparse`` of the route
``kernel_grad``) against PyTorch's weight gradient, in every instruction-set copy."""
import pytest
import torch
import torch.nn.functional as F

from dcls_mm.ops import Dcls2d, depthwise_conv2d, extension, routes
from dcls_mm.ops.depthwise import conv_route, density_step
from dcls_mm.utils import dcls_layer_routes, spread_positions

pytestmark = pytest.mark.skipif(not extension.available(), reason='compiled kernels not built')


@pytest.fixture
def each_isa():
    """Yields a function that switches the compiled kernels to the copy for a capability
    (the CPU's own when it lacks it); restores the running one after the test."""
    running = torch.backends.cpu.get_cpu_capability()
    yield lambda cap: torch.ops.dcls_mm.set_cpu_isa(cap)
    torch.ops.dcls_mm.set_cpu_isa(running)


def sparse_kernel(C, kh, kw, keep, g):
    """A random (C, 1, kh, kw) kernel with about ``keep`` of its taps non-zero; channel 0
    all zeros (no taps at all), channel 1 a single tap."""
    k = torch.randn(C, 1, kh, kw, generator=g)
    k = k * (torch.rand(C, 1, kh, kw, generator=g) < keep)
    k[0] = 0
    k[1] = 0
    k[1, 0, kh // 2, kw - 1] = 2.5
    return k


# Output widths 1, 7, 13, 17, 37 and 70 give every count of vectors across a row (1-4, and
# more than 4) for 16, 8 and 4 lanes; output heights 1-30 full row tiles (up to 24 rows
# of one vector with AVX-512) and every remainder.
SHAPES = [
    (16, (9, 10), (5, 5), ((2, 2), (2, 2)), True),      # 'same'
    (20, (7, 7), (17, 17), ((8, 8), (8, 8)), False),    # kernel larger than the map, 16 + 4 ch
    (3, (1, 13), (1, 1), ((0, 0), (0, 0)), True),       # one row, 1x1 kernel
    (16, (10, 3), (3, 4), ((0, 2), (1, 0)), True),      # asymmetric padding
    (33, (23, 17), (7, 1), ((3, 3), (0, 0)), False),    # 17 columns, 23 rows
    (8, (12, 37), (5, 3), ((2, 2), (1, 1)), True),      # 37 columns
    (16, (19, 60), (11, 11), ((5, 5), (5, 5)), False),  # 60 columns
    (16, (6, 70), (3, 3), ((0, 0), (1, 1)), True),      # 70 columns, no row padding
    (17, (30, 9), (5, 3), ((2, 2), (1, 1)), True),      # one vector across, 30 rows
]


@pytest.mark.parametrize('C,hw,k,pads,with_bias', SHAPES)
@pytest.mark.parametrize('cap', ['AVX512', 'AVX2', 'DEFAULT'])
def test_op_equals_conv2d(each_isa, cap, C, hw, k, pads, with_bias):
    isa = each_isa(cap)
    assert isa == 'baseline' if cap == 'DEFAULT' else isa in ('x86-64-v4', 'x86-64-v3', 'baseline')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, *hw, generator=g)
    kernel = sparse_kernel(C, *k, 0.3, g)
    bias = torch.randn(C, generator=g) if with_bias else None
    (pt, pb), (pl, pr) = pads
    ref = F.conv2d(F.pad(x, (pl, pr, pt, pb)), kernel, bias, 1, 0, 1, C)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = torch.ops.dcls_mm.sparse_depthwise_conv(x.contiguous(memory_format=layout),
                                                      kernel, bias, pt, pb, pl, pr)
        assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('C,hw,k,pads,with_bias', SHAPES[::2] + SHAPES[-1:])
@pytest.mark.parametrize('cap', ['AVX512', 'AVX2', 'DEFAULT'])
def test_kernel_grad_equals_weight_grad_on_support(each_isa, cap, C, hw, k, pads, with_bias):
    each_isa(cap)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, *hw, generator=g)
    support = sparse_kernel(C, *k, 0.3, g) != 0
    (pt, pb), (pl, pr) = pads
    xp = F.pad(x, (pl, pr, pt, pb))
    gy = torch.randn(2, C, xp.shape[2] - k[0] + 1, xp.shape[3] - k[1] + 1, generator=g)
    ref = torch.nn.grad.conv2d_weight(xp.double(), (C, 1, *k), gy.double(), groups=C)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = torch.ops.dcls_mm.sparse_depthwise_kernel_grad(
            x.contiguous(memory_format=layout), gy.contiguous(memory_format=layout), support,
            pt, pb, pl, pr)
        assert got.shape == (C, 1, *k) and got.dtype == torch.float32
        assert torch.equal(got[~support], torch.zeros(int((~support).sum())))
        torch.testing.assert_close(got[support].double(), ref[support], rtol=1e-5, atol=1e-4)


def test_kernel_grad_rejects_bad_input():
    op = torch.ops.dcls_mm.sparse_depthwise_kernel_grad
    x, gy, sup = torch.randn(1, 16, 5, 5), torch.randn(1, 16, 5, 5), torch.ones(16, 1, 3, 3)
    with pytest.raises(RuntimeError, match='float32 tensors expected'):
        op(x.double(), gy.double(), sup, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r'support must be \(C, 1, kh, kw\) with C = x.size\(1\)'):
        op(x, gy, sup[:8], 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r'grad_out must be \(1, 16, 5, 5\), got \[1, 16, 4, 5\]'):
        op(x, gy[:, :, :4], sup, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match='padding must not be negative'):
        op(x, gy, sup, 1, 1, 1, -1)


@pytest.mark.parametrize('cap', ['AVX512', 'AVX2', 'DEFAULT'])
def test_op_dense_and_column_kernels(each_isa, cap):
    """Columns of 11 non-zero taps (runs split into 4 + 4 + 3) and single columns and rows."""
    each_isa(cap)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 19, 21, generator=g)
    dense = torch.randn(16, 1, 11, 11, generator=g)
    column = torch.zeros(16, 1, 11, 11)
    column[:, :, :, 3] = torch.randn(16, 1, 11, generator=g)
    row = torch.zeros(16, 1, 11, 11)
    row[:, :, 7, :] = torch.randn(16, 1, 11, generator=g)
    for kernel in (dense, column, row):
        ref = F.conv2d(x, kernel, None, 1, 5, 1, 16)
        got = torch.ops.dcls_mm.sparse_depthwise_conv(x, kernel, None, 5, 5, 5, 5)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('cap', ['AVX512', 'AVX2', 'DEFAULT'])
def test_kernels_taller_than_32_rows(each_isa, cap):
    """Tap rows are read 32 at a time: a 37-row kernel whose full columns cross row 32
    (column 5's taps, non-zero from row 30 to 36, make runs that end at row 31 and start
    at 32), with 18 columns (a partial last vector of columns, at the end of
    the tensor too), forward and kernel gradient."""
    each_isa(cap)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 17, 40, 9, generator=g)
    keep = torch.rand(17, 1, 37, 18, generator=g) < 0.5
    kernel = torch.randn(17, 1, 37, 18, generator=g) * keep
    kernel[:, :, 30:37, 5] = 1.5  # a column of 7 taps across row 32
    kernel[-1, :, -1, -1] = -2.0  # the tensor's last float
    ref = F.conv2d(F.pad(x, (9, 8, 18, 18)), kernel, None, 1, 0, 1, 17)
    got = torch.ops.dcls_mm.sparse_depthwise_conv(x, kernel, None, 18, 18, 9, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    support = kernel != 0
    xr = x.clone().requires_grad_(True)
    gy = torch.randn_like(ref)
    kr = kernel.clone().requires_grad_(True)
    F.conv2d(F.pad(xr, (9, 8, 18, 18)), kr, None, 1, 0, 1, 17).backward(gy)
    got = torch.ops.dcls_mm.sparse_depthwise_kernel_grad(x, gy, support, 18, 18, 9, 8)
    torch.testing.assert_close(got, kr.grad * support, rtol=1e-4, atol=1e-3)


def test_op_against_loop():
    """A plain loop over the taps (independent of PyTorch's convolution)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64)
    kernel = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    kernel[0, 0, 0, 2], kernel[0, 0, 2, 0], kernel[1, 0, 1, 1] = 0.5, -2.0, 3.0
    bias = torch.tensor([1.0, -1.0], dtype=torch.float64)
    ref = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
    for c in range(2):
        for oy in range(4):
            for ox in range(5):
                total = bias[c].item()
                for i in range(3):
                    for j in range(3):
                        iy, ix = oy + i - 1, ox + j - 1
                        if 0 <= iy < 4 and 0 <= ix < 5:
                            total += kernel[c, 0, i, j].item() * x[0, c, iy, ix].item()
                ref[0, c, oy, ox] = total
    got = torch.ops.dcls_mm.sparse_depthwise_conv(x.float(), kernel.float(), bias.float(),
                                                  1, 1, 1, 1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_zero_taps_are_skipped():
    """A zero weight is never multiplied: an inf under it stays out of the output (the
    dense convolution makes 0 * inf = NaN there), the other outputs are unchanged."""
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = float('inf')
    kernel = torch.zeros(1, 1, 3, 3)
    kernel[0, 0, 0, 0] = 1.0
    got = torch.ops.dcls_mm.sparse_depthwise_conv(x, kernel, None, 1, 1, 1, 1)
    expected = torch.zeros(1, 1, 3, 3)
    expected[0, 0, 2, 2] = float('inf')  # the one output whose non-zero tap meets the inf
    assert torch.equal(got, expected)
    assert F.conv2d(x, kernel, None, 1, 1).isnan().sum() == 8


def test_op_rejects_bad_input():
    op = torch.ops.dcls_mm.sparse_depthwise_conv
    x, k = torch.randn(1, 16, 5, 5), torch.randn(16, 1, 3, 3)
    with pytest.raises(RuntimeError, match='float32 tensors expected'):
        op(x.double(), k.double(), None, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r'x must be \(N, C, H, W\) and kernel \(C, 1, kh, kw\)'):
        op(x, k[:8], None, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match='padding must not be negative'):
        op(x, k, None, 1, 1, -1, 1)
    with pytest.raises(RuntimeError, match='padded input is smaller than the kernel'):
        op(x, torch.randn(16, 1, 9, 9), None, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r'bias must be float32 \(C,\)'):
        op(x, k, torch.randn(8), 1, 1, 1, 1)


def test_route_key_carries_density(monkeypatch, tmp_path):
    """The route is measured per 10% step of the kernel's non-zero share (the sparse
    route's speed depends on it), for channel counts the dense compiled forward does not
    take too; reports find the decision from the density."""
    monkeypatch.setenv('DCLS_MM_ROUTE_CACHE', str(tmp_path / 'routes.json'))
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    for name in ('_memory', '_loaded_from', '_decided', '_used'):
        monkeypatch.setattr(routes, name, {})
    assert [density_step(d) for d in (0.0, 0.04, 0.05, 0.25, 0.37, 1.0)] == [0, 0, 10, 30, 40, 100]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 8, 8, generator=g)
    k = torch.randn(8, 1, 5, 5, generator=g)
    k.view(-1)[torch.randperm(200, generator=g)[:140]] = 0  # 30% of the taps left
    pads = ((2, 2), (2, 2))
    assert conv_route(x.shape, (5, 5), (1, 1), pads, density=0.3) == 'not measured yet'
    with torch.no_grad():
        y = depthwise_conv2d(x, k, (1, 1), pads)
    torch.testing.assert_close(y, F.conv2d(x, k, None, 1, 2, 1, 8), rtol=1e-5, atol=1e-5)
    assert conv_route(x.shape, (5, 5), (1, 1), pads, density=0.31) in ('onednn', 'sparse')
    assert conv_route(x.shape, (5, 5), (1, 1), pads, density=0.9) == 'not measured yet'
    assert [key for key in routes.decisions() if key.startswith('conv ')] == [
        'conv N1 C8 in8x8 k5x5 pad((2, 2), (2, 2)) float32 nz30%']


def test_layer_with_sparse_route_equals_plain_path(monkeypatch):
    """A depthwise Dcls2d layer with spread positions (a trained-like sparse kernel) on
    the sparse route: output and every gradient equal the plain path's; the report says
    which route ran."""
    monkeypatch.setenv('DCLS_MM_ROUTES', 'conv=sparse,kernel_grad=sparse')
    torch.manual_seed(0)
    for interpolation in ('triangle', 'bilinear'):
        m = spread_positions(Dcls2d(24, 24, 5, dilated_kernel_size=11, padding='same',
                                    groups=24, interpolation=interpolation))
        params = [m.weight, m.P, m.bias] + ([m.SIG] if interpolation == 'triangle' else [])
        x = torch.randn(2, 24, 14, 14, requires_grad=True)
        y = m(x)
        got = (y, *torch.autograd.grad(y.square().sum(), [x, *params]))
        reported = dcls_layer_routes(m, x.shape)
        assert reported['conv'] == reported['kernel_grad'] == 'sparse (forced)'
        m.impl = 'plain'
        y = m(x)
        ref = (y, *torch.autograd.grad(y.square().sum(), [x, *params]))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kernel_grad_route_key_carries_density(monkeypatch, tmp_path):
    """A training step of a bilinear layer measures the kernel gradient with the kernel's
    10% step of non-zero taps in the key (8 of 81 here), the report finds it; a layer
    without a gradient support (gaussian) has no step in its key."""
    monkeypatch.setenv('DCLS_MM_ROUTE_CACHE', str(tmp_path / 'routes.json'))
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    for name in ('_memory', '_loaded_from', '_decided', '_used'):
        monkeypatch.setattr(routes, name, {})
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 2, dilated_kernel_size=9, padding='same', groups=16,
               interpolation='bilinear')
    with torch.no_grad():  # 2 elements, 4 taps each, apart: 8 of 81 taps
        m.P[0, :, 0] = torch.tensor([-3.5, 2.5])
        m.P[1, :, 0] = torch.tensor([-3.5, 2.5])
    x = torch.randn(1, 16, 12, 12)
    m(x).sum().backward()
    keys = [k for k in routes.decisions() if k.startswith('kernel_grad ')]
    assert keys == ['kernel_grad N1 C16 in12x12 out12x12 k9x9 pad((4, 4), (4, 4)) s(1, 1) '
                    'float32 nz10%']
    assert dcls_layer_routes(m, x.shape)['kernel_grad'] in ('direct', 'fft', 'sparse')
    g = Dcls2d(16, 16, 2, dilated_kernel_size=9, padding='same', groups=16,
               interpolation='gaussian')
    g(x).sum().backward()
    assert sum(k.startswith('kernel_grad ') and 'nz' not in k for k in routes.decisions()) == 1


def test_grad_support_called_only_by_the_sparse_route(monkeypatch):
    """depthwise_conv2d's grad_support is a function, called in the backward only when the
    sparse kernel gradient runs; its mask must have the kernel's shape; the kernel
    gradient is 0 outside it and exact inside."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 6, generator=g)
    kernel = torch.randn(16, 1, 3, 3, generator=g).requires_grad_()
    mask = torch.rand(16, 1, 3, 3, generator=g) < 0.5
    calls = []

    def support():
        calls.append(1)
        return mask

    pads = ((1, 1), (1, 1))
    monkeypatch.setenv('DCLS_MM_ROUTES', 'kernel_grad=direct')
    depthwise_conv2d(x, kernel, (1, 1), pads, grad_support=support).sum().backward()
    dense = kernel.grad.clone()
    assert calls == [] and (dense != 0).all()
    kernel.grad = None
    monkeypatch.setenv('DCLS_MM_ROUTES', 'kernel_grad=sparse')
    depthwise_conv2d(x, kernel, (1, 1), pads, grad_support=support).sum().backward()
    assert calls == [1]
    assert torch.equal(kernel.grad[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(kernel.grad[mask], dense[mask], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"grad_support must return a bool tensor of the "
                                         r"kernel's shape \(16, 1, 3, 3\), got torch.bool \(16, 1, 2, 3\)"):
        depthwise_conv2d(x, kernel, (1, 1), pads,
                         grad_support=lambda: mask[:, :, :2]).sum().backward()


@pytest.mark.parametrize('capability', ['AVX512', 'AVX2', 'DEFAULT'])
def test_nonzero_count_matches_a_plain_count(each_isa, capability):
    """``dcls_mm::nonzero_count`` (the density of the sparse routes' keys) counts like a
    loop over the values: lengths that are not whole vectors, -0.0 (zero), NaN and inf
    (not zero), a non-contiguous view; and refuses other dtypes."""
    each_isa(capability)
    g = torch.Generator().manual_seed(3)
    for n in (0, 1, 7, 15, 16, 17, 33, 4 * 529 + 5):
        t = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.4)
        special = [-0.0, float('nan'), float('inf'), -float('inf')]
        t[:min(n, 4)] = torch.tensor(special[:min(n, 4)])
        expected = sum(1 for v in t.tolist() if v != 0.0)  # NaN != 0 is True
        assert torch.ops.dcls_mm.nonzero_count(t) == expected
    k = torch.randn(6, 1, 23, 23, generator=g) * (torch.rand(6, 1, 23, 23, generator=g) < 0.2)
    view = k[:, :, 3:17, 2:21]
    assert not view.is_contiguous()
    assert torch.ops.dcls_mm.nonzero_count(view) == sum(1 for v in view.flatten().tolist() if v)
    with pytest.raises(RuntimeError, match='float32 CPU tensor'):
        torch.ops.dcls_mm.nonzero_count(k.double())
