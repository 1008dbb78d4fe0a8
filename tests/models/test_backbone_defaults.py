"""Defaults and geometry corner cases of ConvNeXtDCLS and the converter's safety checks."""
import pytest
import torch

from dcls_mm.models import ConvNeXtDCLS, iso_kernel_count
from dcls_mm.models.backbones.convnext_dcls import (ARCH_SETTINGS, DENSE_KERNEL_SIZE,
                                                    resolve_checkpoint_format)
from dcls_mm.models.convert import check_dilated_kernel_size


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_gaussian_default_kernel_count_is_iso_parameter():
    with torch.device('meta'):
        gauss = ConvNeXtDCLS('tiny', interpolation='gaussian', dilated_kernel_size=23)
        dense = ConvNeXtDCLS('tiny', dwconv_type='dense')
        bigger = ConvNeXtDCLS('tiny', interpolation='gaussian', dilated_kernel_size=23,
                              kernel_count=gauss.stages[0][0].dwconv.kernel_count + 1)
    # the published gaussian ConvNeXt-T uses 26 elements (positions AND SIG shared)
    assert gauss.stages[0][0].dwconv.kernel_count == 26
    assert _count(gauss) <= _count(dense) < _count(bigger)
    depths, dims = ARCH_SETTINGS['tiny']['depths'], ARCH_SETTINGS['tiny']['dims']
    assert iso_kernel_count(depths, dims, True, True) == 26
    assert DENSE_KERNEL_SIZE == 7


@pytest.mark.parametrize('dks', [8, (6, 9)])
def test_even_and_non_square_dilated_kernels_keep_shapes(dks):
    m = ConvNeXtDCLS('atto', dilated_kernel_size=dks, kernel_count=4)
    x = torch.randn(1, 3, 64, 64)
    outs = m(x)
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
    sum(o.sum() for o in outs).backward()
    assert m.stages[0][0].dwconv.P.grad is not None


def test_auto_format_refuses_ambiguous_gaussian_files():
    sd = {'stages.0.0.dwconv.P': torch.zeros(2, 4, 1, 3), 'stages.0.0.dwconv.SIG': torch.zeros(2, 4, 1, 3)}
    assert resolve_checkpoint_format('auto', {'model': sd}) == 'reference_gauss'
    assert resolve_checkpoint_format('auto', {'meta': {}, 'state_dict': sd}) == 'dcls_mm'
    with pytest.raises(ValueError, match='axis order'):
        resolve_checkpoint_format('auto', sd)
    bilinear = {'stages.0.0.dwconv.P': torch.zeros(2, 4, 1, 3)}
    assert resolve_checkpoint_format('auto', bilinear) == 'dcls_mm'


def test_converter_checks_the_dilated_kernel_size():
    check = check_dilated_kernel_size
    P = torch.zeros(2, 4, 1, 3)
    P[0, 0, 0, 0] = 10.5  # needs a 23x23 kernel
    assert check({'stages.0.0.dwconv.P': P}, 23) == 23
    with pytest.raises(ValueError, match='too small'):
        check({'stages.0.0.dwconv.P': P}, None)  # default 17 cannot hold |P| = 10.5
    with pytest.raises(ValueError, match='--dilated-kernel-size'):
        check({'stages.0.0.dwconv.P': P, 'stages.0.0.dwconv.SIG': P}, None)
    assert check({'stages.0.0.dwconv.P': torch.zeros(2, 4, 1, 3)}, None) == 17
