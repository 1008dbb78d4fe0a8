"""Issue 15 (ops): higher-order gradients of the fast path, kernels of bf16/fp16 modules,
input checks (dtype mismatch, empty spatial dims) and the no-grad kernel memo under
``.data`` updates."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dcls_mm.ops import Dcls1d, Dcls2d, Dcls3d, construct_kernel, depthwise_conv2d, extension

ROUTES = ['direct', 'fft']


def _force_route(monkeypatch, route):
    """Make the fast path use one kernel-gradient route (direct C++ sum or FFT)."""
    if route == 'direct':
        assert extension.available(), (
            'the compiled CPU kernels are not built: run bash tools/env/setup.sh')
    monkeypatch.setenv('DCLS_MM_ROUTES', f'kernel_grad={route}')


def _layer(version='gauss', dtype=torch.float32, stride=1):
    torch.manual_seed(0)
    padding = 'same' if stride == 1 else 2
    m = Dcls2d(3, 3, 3, stride=stride, padding=padding, dilated_kernel_size=5, groups=3,
               interpolation=version).to(dtype)
    with torch.no_grad():
        base = torch.randint(-2, 2, m.P.shape).to(dtype)
        m.P.copy_(base + 0.2 + 0.6 * torch.rand_like(base))  # off the grid points
        if m.SIG is not None:
            m.SIG.uniform_(0.2, 0.6)
    return m


def _gradient_penalty_grads(m, x):
    """d/d(x, params) of L = sum over params of |dloss/dparam|^2 (a gradient penalty)."""
    params = list(m.parameters())
    loss = (m(x) ** 2).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum((g ** 2).sum() for g in grads)
    return torch.autograd.grad(penalty, [x] + params)


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('stride', [1, 2])
def test_double_backward_fast_path_equals_plain_path_float32(route, stride, monkeypatch,
                                                             one_thread):
    _force_route(monkeypatch, route)
    m = _layer('v0', stride=stride)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    assert m.uses_fast_path
    fast = _gradient_penalty_grads(m, x)
    m.impl = 'plain'
    plain = _gradient_penalty_grads(m, x)
    for name, a, b in zip(['x', 'weight', 'P', 'bias'], fast, plain):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(),
                                   msg=lambda s: f'{name}: {s}')


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('hw,k,stride,pads', [
    ((5, 6), (3, 4), (1, 1), ((1, 2), (1, 2))),
    ((7, 6), (5, 5), (2, 1), ((2, 2), (0, 3))),
    ((3, 3), (7, 7), (1, 1), ((3, 3), (3, 3))),   # kernel cropped to the input
])
def test_gradgradcheck_depthwise_conv2d_float64(route, hw, k, stride, pads, monkeypatch,
                                                one_thread):
    _force_route(monkeypatch, route)
    torch.manual_seed(0)
    x = torch.randn(1, 2, *hw, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(2, 1, *k, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: depthwise_conv2d(a, b, stride, pads)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, kernel))
    # only one input differentiable: the other gradient slot stays None
    assert torch.autograd.gradgradcheck(lambda a: fn(a, kernel.detach()), (x,))
    assert torch.autograd.gradgradcheck(lambda b: fn(x.detach(), b), (kernel,))
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: depthwise_conv2d(a, b, stride, pads, c), (x, kernel, bias))


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('version', ['v0', 'gauss'])
def test_gradgradcheck_dcls2d_fast_path_float64(route, version, monkeypatch, one_thread):
    _force_route(monkeypatch, route)
    m = _layer(version, torch.float64)
    assert m.uses_fast_path
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradgradcheck(fn, (x, *params), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('version', ['v0', 'v1', 'max', 'gauss'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_module_builds_its_kernel_in_float32(version, dtype):
    torch.manual_seed(0)
    m = Dcls2d(4, 4, 34, dilated_kernel_size=17, groups=4, padding='same',
               interpolation=version).to(dtype)
    with torch.no_grad():
        if m.SIG is not None:
            m.SIG.uniform_(0.1, 1.0)
    kernel = m.construct_kernel()
    assert kernel.dtype == dtype
    # the same (rounded) parameters, kernel built in float64: the only error left is the
    # final rounding to bf16/fp16, half a unit in the last place of each tap
    ref = construct_kernel(m.weight.double(), m.P.double(),
                           None if m.SIG is None else m.SIG.double(), (17, 17), m.interpolation)
    eps = torch.finfo(dtype).eps
    err = (kernel.double() - ref).abs()
    # (+ a floor far below the old bf16 construction's 1-10% of max |w|, for the float32
    # build's own rounding and fp16 subnormals)
    bound = 0.5 * eps * ref.abs() + 1e-5 * ref.abs().max()
    assert (err <= bound).all(), (err / ref.abs().max()).max()
    # gradients still reach the low-precision parameters
    m(torch.randn(1, 4, 8, 8, dtype=dtype)).sum().backward()
    assert m.weight.grad.dtype == dtype and m.P.grad.abs().sum() > 0


@pytest.mark.parametrize('impl', ['auto', 'plain'])
def test_mixed_input_and_parameter_dtypes_raise_on_both_paths(impl):
    m = Dcls2d(3, 3, 2, dilated_kernel_size=5, padding='same', groups=3, impl=impl)
    with pytest.raises(TypeError, match=r'input dtype torch.float64 does not match the '
                       r"parameters' dtype torch.float32"):
        m(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match='input dtype torch.bfloat16'):
        m(torch.randn(1, 3, 6, 6, dtype=torch.bfloat16))
    # under autocast both paths convolve in the autocast dtype, as F.conv2d would
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(torch.randn(1, 3, 6, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize('cls,shape', [
    (Dcls1d, (2, 3, 0)), (Dcls2d, (2, 3, 0, 5)), (Dcls2d, (3, 5, 0)), (Dcls3d, (1, 3, 4, 0, 4)),
])
def test_empty_spatial_dim_is_refused_by_the_layer(cls, shape):
    m = cls(3, 3, 2, dilated_kernel_size=3, padding=1, groups=3)
    with pytest.raises(ValueError, match=r'empty spatial dim, shape \(' + ', '.join(
            str(s) for s in shape) + r'\)'):
        m(torch.randn(shape))


def test_empty_batch_still_works():
    m = Dcls2d(3, 3, 2, dilated_kernel_size=5, padding='same', groups=3)
    assert m(torch.randn(0, 3, 6, 6)).shape == (0, 3, 6, 6)


@pytest.mark.parametrize('impl', ['auto', 'plain'])
def test_no_grad_kernel_sees_data_updates(impl):
    """``.data`` updates do not bump version counters; the reused kernel must still follow."""
    m = _layer('gauss')
    m.impl = impl
    x = torch.randn(2, 3, 7, 7)
    fresh = _layer('gauss')
    fresh.impl = impl
    with torch.no_grad():
        m(x)
        for update in (lambda: m.weight.data.mul_(2), lambda: m.P.data.add_(0.3),
                       lambda: m.SIG.data.mul_(1.5), lambda: m.bias.data.add_(1)):
            update()
            fresh.load_state_dict(m.state_dict())
            torch.testing.assert_close(m(x), fresh(x), rtol=0, atol=0)
        # unchanged values: the kernels are reused, not rebuilt
        memo = m.__dict__['_inference_memo_']
        kernels = dict(memo.kernels)
        m.construct_kernel()
        m(x)
        assert m.__dict__['_inference_memo_'] is memo
        assert kernels and all(memo.kernels[w] is k for w, k in kernels.items())


def test_dense_reference_of_the_data_update_case():
    """The rebuilt kernel after ``.data.mul_(2)`` is twice the old one (linear in w)."""
    m = _layer('v0')
    with torch.no_grad():
        k1 = m.construct_kernel().clone()
        m.weight.data.mul_(2)
        k2 = m.construct_kernel()
    torch.testing.assert_close(k2, 2 * k1)
    ref = F.conv2d(torch.ones(1, 3, 5, 5), k2, m.bias, padding=2, groups=3)
    with torch.no_grad():
        torch.testing.assert_close(m(torch.ones(1, 3, 5, 5)), ref, rtol=1e-5, atol=1e-5)
