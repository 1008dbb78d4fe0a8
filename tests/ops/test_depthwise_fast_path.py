"""The fast depthwise path equals the plain path (construct kernel + F.conv2d)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from dcls_mm.ops import Dcls2d, depthwise_conv2d, extension, set_impl


@pytest.fixture(params=['direct', 'fft'], autouse=True)
def kernel_grad_route(request, monkeypatch):
    """Run every test with each way of computing the kernel gradient (measured per
    shape otherwise, dcls_mm.ops.routes; both must be exact)."""
    if request.param == 'direct':
        assert extension.available(), (
            'the compiled CPU kernels are not built: run bash tools/env/setup.sh')
    monkeypatch.setenv('DCLS_MM_ROUTES', f'kernel_grad={request.param}')
    return request.param

CASES = list(itertools.product(
    ['v0', 'v1', 'max', 'gauss'],  # interpolation
    [1, 2],                        # stride
    [(9, 9), (8, 11), (5, 4)],     # odd / even / smaller than the kernel
    [False, True],                 # channels_last input
    [(7, 7), (6, 5)],              # odd and even dilated kernel sizes
))


def _outputs_and_grads(m, x, gy):
    y = m(x)
    grads = torch.autograd.grad(y, [x] + [p for p in m.parameters()], gy)
    return y, grads


@pytest.mark.parametrize('version,stride,hw,channels_last,dks', CASES)
def test_fast_path_matches_plain_path(version, stride, hw, channels_last, dks):
    torch.manual_seed(0)
    padding = 'same' if stride == 1 else (dks[0] // 2, dks[1] // 2)
    m = Dcls2d(6, 6, 4, stride=stride, padding=padding, dilated_kernel_size=dks, groups=6,
               interpolation=version)
    with torch.no_grad():
        if m.SIG is not None:
            m.SIG.uniform_(0.1, 0.6)
    assert m.uses_fast_path
    x = torch.randn(2, 6, *hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    m.impl = 'plain'
    y_plain = m(x)
    gy = torch.randn_like(y_plain)
    y_plain, g_plain = _outputs_and_grads(m, x, gy)
    m.impl = 'auto'
    y_fast, g_fast = _outputs_and_grads(m, x, gy)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    names = ['input'] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6,
                                   msg=lambda s: f'{name}: {s}')


@pytest.mark.parametrize('version', ['v0', 'gauss'])
def test_fast_path_bfloat16(version):
    torch.manual_seed(0)
    m = Dcls2d(8, 8, 5, padding='same', dilated_kernel_size=9, groups=8, interpolation=version)
    x = torch.randn(2, 8, 12, 12).to(torch.bfloat16).requires_grad_(True)
    m.impl = 'plain'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_plain = m(x)
    gy = torch.randn_like(y_plain)
    g_plain = torch.autograd.grad(y_plain, [x] + list(m.parameters()), gy)
    m.impl = 'auto'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_fast = m(x)
    g_fast = torch.autograd.grad(y_fast, [x] + list(m.parameters()), gy)
    assert y_fast.dtype == y_plain.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_plain.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_fast, g_plain):
        assert a.dtype == b.dtype
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2 * scale)


def test_fast_path_is_chosen_automatically_and_can_be_forced_off():
    dw = Dcls2d(4, 4, 3, padding='same', dilated_kernel_size=7, groups=4)
    assert dw.uses_fast_path
    assert not Dcls2d(4, 8, 3, padding='same', dilated_kernel_size=7, groups=4).uses_fast_path
    assert not Dcls2d(4, 4, 3, padding='same', dilated_kernel_size=7, groups=4,
                      padding_mode='reflect').uses_fast_path
    model = torch.nn.Sequential(dw, Dcls2d(4, 4, 3, padding=3, dilated_kernel_size=7, groups=4))
    set_impl(model, 'plain')
    assert not any(m.uses_fast_path for m in model)
    with pytest.raises(ValueError, match='impl'):
        Dcls2d(4, 4, 3, dilated_kernel_size=7, groups=4, impl='cuda')
    # unbatched input on the fast path
    x = torch.randn(4, 9, 9)
    set_impl(model, 'auto')
    torch.testing.assert_close(dw(x), dw(x.unsqueeze(0))[0])


@pytest.mark.parametrize('hw,k,stride,pads', [
    ((7, 7), (17, 17), (1, 1), ((8, 8), (8, 8))),   # kernel larger than the map: cropped
    ((10, 9), (5, 6), (2, 1), ((1, 3), (0, 2))),    # asymmetric padding, mixed stride
    ((11, 11), (3, 3), (2, 2), ((0, 0), (0, 0))),   # trailing row/col unused
    ((6, 5), (3, 3), (1, 1), ((4, 4), (4, 4))),     # padding larger than the kernel
    ((1, 8), (1, 1), (3, 3), ((1, 1), (1, 1))),     # no tap meets a row: the bias alone
    ((1, 1), (2, 2), (4, 4), ((2, 2), (2, 2))),     # no tap meets the map at all
    ((8, 9), (3, 3), (1, 1), ((-1, 1), (1, 1))),    # negative top padding (F.pad's crop)
    ((8, 9), (3, 3), (1, 2), ((-2, -1), (-3, 2))),  # negative top, bottom and left
])
@pytest.mark.parametrize('with_bias', [False, True])
def test_depthwise_conv2d_function(hw, k, stride, pads, with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, *hw, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(5, 1, *k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, kernel) + ((bias, ) if with_bias else ())
    (pt, pb), (pl, pr) = pads
    ref = F.conv2d(F.pad(x, (pl, pr, pt, pb)), kernel, bias, stride, 0, 1, 5)
    got = depthwise_conv2d(x, kernel, stride, pads, bias)
    torch.testing.assert_close(got, ref)
    gy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, inputs, gy),
                               torch.autograd.grad(ref, inputs, gy))
    small = [x[:1, :2], kernel[:2]] + ([bias[:2]] if with_bias else [])
    assert torch.autograd.gradcheck(lambda a, b, *c: depthwise_conv2d(a, b, stride, pads, *c),
                                    [t.detach().requires_grad_() for t in small])


def test_fast_path_under_torch_compile_and_export():
    torch.manual_seed(0)
    m = Dcls2d(8, 8, 4, dilated_kernel_size=9, padding='same', groups=8, interpolation='v0')
    assert m.uses_fast_path
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    compiled = torch.compile(m)
    y_compiled, y_eager = compiled(x), m(x)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    g_compiled = torch.autograd.grad(y_compiled.square().sum(), [x, m.P, m.weight])
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, m.P, m.weight])
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    exported = torch.export.export(m, (x.detach(),))
    torch.testing.assert_close(exported.module()(x.detach()), m(x.detach()), rtol=1e-5, atol=1e-5)


def test_depthwise_conv2d_float32_with_negative_leading_padding():
    """float32, so that the compiled routes run (the kernel-gradient fixture forces
    `direct`, which takes no negative top/left padding: the input is sliced instead)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 9, requires_grad=True)
    kernel = torch.randn(16, 1, 3, 3, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    pads = ((-1, 1), (-2, 1))
    got = depthwise_conv2d(x, kernel, (1, 1), pads, bias)
    inputs64 = [t.detach().double().requires_grad_() for t in (x, kernel, bias)]
    ref = F.conv2d(F.pad(inputs64[0], (-2, 1, -1, 1)), inputs64[1], inputs64[2], groups=16)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(got, (x, kernel, bias), gy.float())
    for g, r in zip(grads, torch.autograd.grad(ref, inputs64, gy)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)
    # the inference plan slices every later input the same way
    from dcls_mm.ops.depthwise import depthwise_conv2d_plan
    with torch.no_grad():
        y, plan = depthwise_conv2d_plan(x, kernel, (1, 1), pads, bias)
        torch.testing.assert_close(y, got.detach())
        other = torch.randn_like(x)
        torch.testing.assert_close(plan(other, bias), depthwise_conv2d(other, kernel, (1, 1),
                                                                       pads, bias))


def test_layer_whose_windows_all_lie_in_the_padding():
    """Stride 4, padding 2, a 2x2 dilated kernel on a 1x1 map: no tap meets the input
    (the crop used to leave an empty window: ValueError)."""
    torch.manual_seed(0)
    m = Dcls2d(4, 4, 2, stride=4, padding=2, dilated_kernel_size=2, groups=4)
    x = torch.randn(1, 4, 1, 1, requires_grad=True)
    y = m(x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), y.detach())
    torch.testing.assert_close(y, m.bias.detach().view(1, 4, 1, 1).expand_as(y))
    set_impl(m, 'plain')
    torch.testing.assert_close(y, m(x))
