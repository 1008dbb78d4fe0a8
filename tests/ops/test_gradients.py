"""Gradients: gradcheck in float64 for every module and interpolation, and learning a shift."""
import math

import pytest
import torch
from torch.func import functional_call

from dcls_mm.ops import Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3d

VERSIONS = ['v0', 'v1', 'max', 'gauss']
CASES = [
    (Dcls1d, dict(dilated_kernel_size=5), (1, 2, 7)),
    (Dcls2d, dict(dilated_kernel_size=(5, 4)), (1, 2, 6, 5)),
    (Dcls3d, dict(dilated_kernel_size=(3, 3, 4)), (1, 2, 4, 4, 5)),
    (Dcls2_1d, dict(dense_kernel_size=2, dilated_kernel_size=5), (1, 2, 4, 6)),
    (Dcls3_1d, dict(dense_kernel_size=(2, 1), dilated_kernel_size=4), (1, 2, 3, 3, 5)),
    (Dcls2dK1d, dict(dilated_kernel_size=5, flat_dim=0), (1, 2, 6, 4)),
]


@pytest.mark.parametrize('version', VERSIONS)
@pytest.mark.parametrize('cls,kwargs,shape', CASES, ids=[c[0].__name__ for c in CASES])
def test_gradcheck(cls, kwargs, shape, version):
    torch.manual_seed(0)
    m = cls(2, 2, 2, padding=1, interpolation=version, **kwargs).double()
    with torch.no_grad():
        # positions strictly between grid points (bilinear is piecewise linear), |SIG| > 0
        for d, L in enumerate(m.dilated_kernel_size):
            lim = L // 2
            base = torch.randint(-lim, lim, m.P[d].shape, dtype=torch.float64)
            m.P[d].copy_(base + 0.2 + 0.6 * torch.rand_like(base))
        if m.SIG is not None:
            m.SIG.copy_(0.3 + 0.4 * torch.rand_like(m.SIG))
    names = [n for n, _ in m.named_parameters()]
    assert ('SIG' in names) == (version in ('max', 'gauss'))
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in m.named_parameters())

    def fn(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def _smooth_1d(t):
    return torch.exp(-((t - 40.0) / 9.0) ** 2) + 0.5 * torch.sin(t / 6.0)


def test_dcls1d_learns_a_shift():
    """target[n] = x(n + s): the single element must move to P = s (cross-correlation)."""
    torch.manual_seed(0)
    s = 3.3
    n = torch.arange(80, dtype=torch.float32)
    x, y = _smooth_1d(n), _smooth_1d(n + s)
    m = Dcls1d(1, 1, 1, dilated_kernel_size=15, padding='same', bias=False, interpolation='v0')
    with torch.no_grad():
        m.weight.fill_(0.5)
        m.P.fill_(0.0)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    valid = slice(8, -8)  # away from the zero padding
    for _ in range(600):
        opt.zero_grad()
        loss = ((m(x.view(1, 1, -1))[0, 0] - y)[valid] ** 2).mean()
        loss.backward()
        opt.step()
        m.clamp_parameters()
    assert abs(m.P.item() - s) < 0.05, m.P.item()
    assert abs(m.weight.item() - 1.0) < 0.05


@pytest.mark.parametrize('version', ['v0', 'gauss'])
def test_dcls2d_learns_a_2d_shift(version):
    s = (2.6, -1.7)
    r = torch.arange(48, dtype=torch.float32)
    def image(dy, dx):
        yy, xx = torch.meshgrid(r + dy, r + dx, indexing='ij')
        return (torch.exp(-((yy - 22) ** 2 + (xx - 26) ** 2) / 120.0)
                + 0.3 * torch.sin(yy / 5.0) * torch.cos(xx / 7.0))
    x, y = image(0, 0), image(*s)
    m = Dcls2d(1, 1, 1, dilated_kernel_size=11, padding='same', bias=False, interpolation=version)
    with torch.no_grad():
        m.weight.fill_(0.5)
        m.P.zero_()
    opt = torch.optim.SGD(m.parameters(), lr=3.0)
    valid = (slice(7, -7), slice(7, -7))
    for _ in range(600):
        opt.zero_grad()
        loss = ((m(x.view(1, 1, 48, 48))[0, 0] - y)[valid] ** 2).mean()
        loss.backward()
        opt.step()
        m.clamp_parameters()
    got = m.P.detach().view(2).tolist()
    # P[0] is the row (height) shift, P[1] the column (width) shift
    assert abs(got[0] - s[0]) < 0.05 and abs(got[1] - s[1]) < 0.05, got


def test_border_positions_keep_a_gradient():
    """A position clamped to the border (an integer) still gets a gradient back inside."""
    m = Dcls1d(1, 1, 1, dilated_kernel_size=7, padding='same', bias=False, interpolation='v0')
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.P.fill_(3.0)
    x = torch.linspace(0, 1, 20).view(1, 1, -1)
    m(x).sum().backward()
    assert m.P.grad.abs().item() > 0
    assert math.isfinite(m.P.grad.item())
