"""dcls_mm.ops.introspect: recognising DCLS layers (ours and, by duck typing, the
reference package's) and naming their interpolation."""
import pytest
import torch
from torch import nn

from dcls_mm.ops import Dcls1d, Dcls2d, is_dcls_layer, layer_interpolation


class ReferenceLikeLayer(nn.Module):
    """What the reference ``DCLS`` package's layers look like to us: ``P``, a
    ``clamp_parameters`` method and the interpolation in ``.version``."""

    def __init__(self, version=None):
        super().__init__()
        self.P = nn.Parameter(torch.zeros(2, 3, 1, 4))
        if version is not None:
            self.version = version

    def clamp_parameters(self):
        pass


@pytest.mark.parametrize('version,expected', [
    ('v0', 'bilinear'), ('v1', 'bilinear_normalized'), ('max', 'triangle'),
    ('gauss', 'gaussian'), (None, 'bilinear')])   # no .version: the package's default v0
def test_reference_layers_interpolation(version, expected):
    layer = ReferenceLikeLayer(version)
    assert is_dcls_layer(layer)
    assert layer_interpolation(layer) == expected


def test_our_layers_interpolation_without_deprecation_warning(recwarn):
    assert layer_interpolation(Dcls2d(3, 3, 2, dilated_kernel_size=5, groups=3,
                                      interpolation='gauss')) == 'gaussian'
    assert layer_interpolation(Dcls1d(3, 3, 2, dilated_kernel_size=5,
                                      interpolation='v1')) == 'bilinear_normalized'
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert not is_dcls_layer(nn.Conv2d(3, 3, 3))


def test_unknown_reference_version_is_named():
    with pytest.raises(ValueError, match="'cubic'"):
        layer_interpolation(ReferenceLikeLayer('cubic'))
