"""The compiled stride-1 depthwise forward (``dcls_mm::depthwise_conv``, one candidate of
the measured route ``conv``) against ``F.conv2d`` on an explicitly padded input."""
import pytest
import torch
import torch.nn.functional as F

from dcls_mm.ops import Dcls2d, depthwise_conv2d, extension, routes
from dcls_mm.ops.depthwise import conv_route
from dcls_mm.utils import dcls_layer_routes


@pytest.mark.parametrize('C,hw,k,pads,with_bias', [
    (32, (9, 10), (5, 5), ((2, 2), (2, 2)), True),      # 'same'
    (48, (7, 7), (17, 17), ((8, 8), (8, 8)), False),    # kernel larger than the map
    (16, (10, 3), (3, 4), ((0, 2), (1, 0)), True),      # asymmetric, fewer than 4 columns
    (16, (6, 13), (7, 1), ((3, 3), (0, 0)), False),     # 13 columns, one tap per row
    (32, (5, 15), (3, 5), ((1, 1), (2, 2)), True),      # 15 columns: tiles of 8 + 4 + 2 + 1
    (16, (4, 40), (3, 12), ((1, 1), (5, 6)), True),     # runs of tap pairs (AVX-512), even kw
])
def test_op_equals_conv2d(C, hw, k, pads, with_bias):
    assert extension.available()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, *hw, generator=g)
    kernel = torch.randn(C, 1, *k, generator=g)
    bias = torch.randn(C, generator=g) if with_bias else None
    (pt, pb), (pl, pr) = pads
    ref = F.conv2d(F.pad(x, (pl, pr, pt, pb)), kernel, bias, 1, 0, 1, C)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = torch.ops.dcls_mm.depthwise_conv(x.contiguous(memory_format=layout), kernel, bias,
                                               pt, pb, pl, pr)
        assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_op_rejects_bad_input():
    op = torch.ops.dcls_mm.depthwise_conv
    x, k = torch.randn(1, 16, 5, 5), torch.randn(16, 1, 3, 3)
    with pytest.raises(RuntimeError, match='float32 tensors expected'):
        op(x.double(), k.double(), None, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match='multiple of 16, got 8'):
        op(x[:, :8], k[:8], None, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r'x must be \(N, C, H, W\) and kernel \(C, 1, kh, kw\)'):
        op(x, k[:8], None, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match='padding must not be negative'):
        op(x, k, None, -1, 1, 1, 1)
    with pytest.raises(RuntimeError, match='padded input is smaller than the kernel'):
        op(x, torch.randn(16, 1, 9, 9), None, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r'bias must be float32 \(C,\)'):
        op(x, k, torch.randn(8), 1, 1, 1, 1)


@pytest.mark.parametrize('forced', ['direct', 'onednn', 'sparse'])
def test_layer_same_on_both_forward_routes(monkeypatch, forced):
    """Forward and every gradient of a depthwise Dcls2d layer (whose input gradient is a
    stride-1 convolution too) agree with the plain path whichever route runs."""
    assert extension.available()
    torch.manual_seed(0)
    m = Dcls2d(32, 32, 6, dilated_kernel_size=11, padding='same', groups=32,
               interpolation='bilinear')
    x = torch.randn(2, 32, 9, 9, requires_grad=True)
    monkeypatch.setenv('DCLS_MM_ROUTES', f'conv={forced}')
    y = m(x)
    got = (y, *torch.autograd.grad(y.square().sum(), [x, m.weight, m.P, m.bias]))
    assert dcls_layer_routes(m, x.shape)['conv'] == f'{forced} (forced)'
    m.impl = 'plain'
    y = m(x)
    ref = (y, *torch.autograd.grad(y.square().sum(), [x, m.weight, m.P, m.bias]))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_route_measured_once_per_shape_and_reported(monkeypatch, tmp_path):
    monkeypatch.setenv('DCLS_MM_ROUTE_CACHE', str(tmp_path / 'routes.json'))
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    # this process's decisions so far (earlier tests may have run this shape, e.g. a
    # layer whose kernel was cropped to 5x5) are set aside
    for name in ('_memory', '_loaded_from', '_decided', '_used'):
        monkeypatch.setattr(routes, name, {})
    x, k = torch.randn(1, 16, 8, 8), torch.randn(16, 1, 5, 5)
    assert conv_route(x.shape, (5, 5), (1, 1), ((2, 2), (2, 2))) == 'not measured yet'
    with torch.no_grad():
        y = depthwise_conv2d(x, k, (1, 1), ((2, 2), (2, 2)))
    torch.testing.assert_close(y, F.conv2d(x, k, None, 1, 2, 1, 16), rtol=1e-5, atol=1e-5)
    chosen = conv_route(x.shape, (5, 5), (1, 1), ((2, 2), (2, 2)))  # a dense kernel
    assert chosen in ('direct', 'onednn', 'sparse')
    assert any(key.startswith('conv N1 C16 in8x8 k5x5') for key in routes.decisions())
    # strided or float64: oneDNN only
    assert conv_route(x.shape, (5, 5), (2, 2), ((2, 2), (2, 2))) == 'onednn (only one available)'
    assert conv_route(x.shape, (5, 5), (1, 1), ((2, 2), (2, 2)), torch.float64) == \
        'onednn (only one available)'
