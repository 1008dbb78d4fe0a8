"""dcls-mm: Dilated Convolution with Learnable Spacings for OpenMMLab 2.0.

Layers live in :mod:`dcls_mm.ops` (pure PyTorch, importable without OpenMMLab);
backbones in :mod:`dcls_mm.models`; optimizer constructors and hooks in
:mod:`dcls_mm.engine`; robustness datasets and metrics in :mod:`dcls_mm.evaluation`.
Configs reach everything through the ``dcls_mm`` registry scope
(:mod:`dcls_mm.registry`), e.g. ``type='dcls_mm.ConvNeXtDCLS'``.
"""
from .ops import (Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3d,
                  construct_kernel)
from .version import __version__

# Registers the backbones, the timm models (``timm.create_model('convnext_dcls_tiny')``),
# the optimizer constructor and the hooks. ``dcls_mm.ops`` itself imports only torch.
from . import engine, models  # noqa: E402,F401  isort:skip

__all__ = [
    '__version__', 'Dcls1d', 'Dcls2d', 'Dcls3d', 'Dcls2_1d', 'Dcls3_1d', 'Dcls2dK1d',
    'construct_kernel'
]
