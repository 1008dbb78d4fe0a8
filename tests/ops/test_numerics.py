"""construct_kernel() and forward() against the plain dense formula of the method."""
import pytest
import torch
import torch.nn.functional as F

from dcls_mm.ops import Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3d

from .dense_reference import reference_kernel

VERSIONS = ['v0', 'v1', 'max', 'gauss']


def _randomize(m, border=False, seed=0):
    """Random weights, positions anywhere in the clamped range (optionally some exactly on
    the borders), random SIG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g))
        for d, L in enumerate(m.dilated_kernel_size):
            lim = L // 2
            p = (torch.rand(m.P[d].shape, generator=g) * 2 - 1) * lim
            if border:
                flat = p.view(-1)
                flat[0::3] = lim
                flat[1::3] = -lim
            m.P[d].copy_(p)
        if m.SIG is not None:
            m.SIG.copy_(torch.randn(m.SIG.shape, generator=g) * 0.5)
    return m


def _check(m, border):
    _randomize(m.double(), border=border)
    got = m.construct_kernel()
    ref = reference_kernel(m.weight, m.P, m.SIG, m.dilated_kernel_size, {
        'bilinear': 'v0', 'bilinear_normalized': 'v1', 'triangle': 'max',
        'gaussian': 'gauss'}[m.interpolation])
    if isinstance(m, Dcls2dK1d):
        ref = ref.unsqueeze(-1 - m.flat_dim)
    assert got.shape == ref.shape
    scale = ref.abs().max()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * scale)
    return got


@pytest.mark.parametrize('version', VERSIONS)
@pytest.mark.parametrize('dks', [(5, 5), (7, 4), (3, 6)])
@pytest.mark.parametrize('groups,cin,cout,K', [(1, 2, 3, 4), (3, 3, 3, 2), (1, 1, 1, 1)])
@pytest.mark.parametrize('border', [False, True])
def test_dcls2d_kernel(version, dks, groups, cin, cout, K, border):
    _check(Dcls2d(cin, cout, K, dilated_kernel_size=dks, groups=groups, interpolation=version), border)


@pytest.mark.parametrize('version', VERSIONS)
@pytest.mark.parametrize('dks', [9, 6])
@pytest.mark.parametrize('border', [False, True])
def test_dcls1d_kernel(version, dks, border):
    _check(Dcls1d(2, 4, 3, dilated_kernel_size=dks, groups=2, interpolation=version), border)
    _check(Dcls1d(1, 2, 5, dilated_kernel_size=dks, interpolation=version), border)


@pytest.mark.parametrize('version', VERSIONS)
@pytest.mark.parametrize('dks', [(3, 3, 3), (5, 3, 4)])
def test_dcls3d_kernel(version, dks):
    _check(Dcls3d(2, 2, 3, dilated_kernel_size=dks, groups=2, interpolation=version), border=True)
    _check(Dcls3d(1, 2, 2, dilated_kernel_size=dks, interpolation=version), border=False)


@pytest.mark.parametrize('version', VERSIONS)
def test_dcls2_1d_and_3_1d_kernel(version):
    _check(Dcls2_1d(2, 3, 3, dense_kernel_size=3, dilated_kernel_size=7, interpolation=version), True)
    _check(Dcls2_1d(2, 2, 2, dense_kernel_size=2, dilated_kernel_size=6, groups=2,
                    interpolation=version), False)
    _check(Dcls3_1d(1, 2, 2, dense_kernel_size=(2, 3), dilated_kernel_size=5,
                    interpolation=version), True)


@pytest.mark.parametrize('version', VERSIONS)
@pytest.mark.parametrize('flat_dim', [0, 1])
def test_dcls2dk1d_kernel(version, flat_dim):
    k = _check(Dcls2dK1d(2, 2, 3, dilated_kernel_size=7, flat_dim=flat_dim, interpolation=version),
               True)
    assert k.shape == ((2, 2, 7, 1) if flat_dim == 0 else (2, 2, 1, 7))


def test_bilinear_has_at_most_four_taps_and_v0_v1_agree():
    m = _randomize(Dcls2d(3, 3, 5, dilated_kernel_size=(9, 7), groups=3, interpolation='v0')).double()
    k0 = m.construct_kernel()
    m.interpolation = 'bilinear_normalized'
    k1 = m.construct_kernel()
    # inside the clamped range the tap sum is 1, so v1 = v0 / (1 + 1e-7)
    torch.testing.assert_close(k1, k0 / (1 + 1e-7), rtol=1e-12, atol=1e-12)
    single = Dcls2d(1, 1, 1, dilated_kernel_size=9, interpolation='v0').double()
    with torch.no_grad():
        single.weight.fill_(1.0)
        single.P.copy_(torch.tensor([0.3, -1.6]).view(2, 1, 1, 1))
    k = single.construct_kernel()[0, 0]
    assert int((k != 0).sum()) == 4
    # row 4 + 0.3 -> rows 4 (0.7), 5 (0.3); column 4 - 1.6 = 2.4 -> columns 2 (0.6), 3 (0.4)
    assert k[4, 2].item() == pytest.approx(0.7 * 0.6)
    assert k[5, 3].item() == pytest.approx(0.3 * 0.4)


@pytest.mark.parametrize('cls,kwargs,shape', [
    (Dcls1d, dict(dilated_kernel_size=7), (2, 4, 20)),
    (Dcls2d, dict(dilated_kernel_size=(7, 5)), (2, 4, 12, 11)),
    (Dcls3d, dict(dilated_kernel_size=(3, 5, 3)), (1, 4, 6, 7, 8)),
    (Dcls2_1d, dict(dense_kernel_size=3, dilated_kernel_size=7), (2, 4, 9, 13)),
    (Dcls3_1d, dict(dense_kernel_size=(3, 1), dilated_kernel_size=5), (1, 4, 5, 6, 9)),
    (Dcls2dK1d, dict(dilated_kernel_size=7, flat_dim=1), (2, 4, 9, 13)),
])
@pytest.mark.parametrize('version', ['v0', 'gauss'])
@pytest.mark.parametrize('padding,padding_mode,stride', [
    ('same', 'zeros', 1), (1, 'zeros', 2), ('same', 'reflect', 1), (2, 'circular', 1)])
def test_forward_is_conv_with_reference_kernel(cls, kwargs, shape, version, padding,
                                               padding_mode, stride):
    m = _randomize(cls(4, 6, 3, stride=stride, padding=padding, groups=2,
                       padding_mode=padding_mode, interpolation=version, **kwargs)).double()
    x = torch.randn(shape, dtype=torch.float64)
    ref_k = reference_kernel(m.weight, m.P, m.SIG, m.dilated_kernel_size,
                             'v0' if version == 'v0' else 'gauss')
    if cls is Dcls2dK1d:
        ref_k = ref_k.unsqueeze(-1 - m.flat_dim)
    n = x.dim() - 2
    ks = ref_k.shape[2:]
    if padding == 'same':
        pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks]
    else:
        pads = [(padding, padding)] * n
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    xp = F.pad(x, flat, mode='constant' if padding_mode == 'zeros' else padding_mode)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    ref = conv(xp, ref_k, m.bias, stride, 0, 1, 2)
    got = m(x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    if padding == 'same':
        assert got.shape[2:] == x.shape[2:]
    # unbatched input
    torch.testing.assert_close(m(x[0]), got[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('version', VERSIONS)
@pytest.mark.parametrize('cls,kwargs', [
    (Dcls1d, dict(dilated_kernel_size=7)), (Dcls2d, dict(dilated_kernel_size=(7, 6))),
    (Dcls3d, dict(dilated_kernel_size=(3, 5, 4))),
])
def test_positions_outside_the_dilated_kernel(cls, kwargs, version):
    """Between optimizer steps (no clamping hook) positions can leave the range: taps
    that fall off the grid are dropped, exactly as the dense formula does."""
    m = cls(2, 2, 4, interpolation=version, **kwargs).double()
    _randomize(m)
    with torch.no_grad():
        for d, L in enumerate(m.dilated_kernel_size):
            lim = L // 2
            flat = m.P[d].view(-1)
            flat[0::4] = lim + 0.4      # one tap on the grid, one off
            flat[1::4] = -lim - 0.7     # one tap on the grid, one off
            flat[2::4] = lim + 3.3      # both off
    got = m.construct_kernel()
    ref = reference_kernel(m.weight, m.P, m.SIG, m.dilated_kernel_size, {
        'bilinear': 'v0', 'bilinear_normalized': 'v1', 'triangle': 'max',
        'gaussian': 'gauss'}[m.interpolation])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max())
