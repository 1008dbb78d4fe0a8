"""dcls-mm: Dilated Convolution with Learnable Spacings for OpenMMLab 2.0.

Layers live in :mod:`dcls_mm.ops` (pure PyTorch: ``import dcls_mm`` and
``import dcls_mm.ops`` need only torch); backbones, checkpoint loading and the timm
models in :mod:`dcls_mm.models`; optimizer constructors and hooks in
:mod:`dcls_mm.engine`; robustness runners and metrics in
:mod:`dcls_mm.evaluation`, corruptions and demo data in :mod:`dcls_mm.datasets`,
analysis in :mod:`dcls_mm.analysis`. Configs reach everything through the ``dcls_mm``
registry scope (:mod:`dcls_mm.registry`), e.g. ``type='dcls_mm.ConvNeXtDCLS'``, which
imports the implementation on first use; ``import dcls_mm.models`` registers the timm
models (``timm.create_model('convnext_dcls_tiny')``).
"""
from .ops import (Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3d,
                  construct_kernel)
from .version import __version__

__all__ = [
    '__version__', 'Dcls1d', 'Dcls2d', 'Dcls3d', 'Dcls2_1d', 'Dcls3_1d', 'Dcls2dK1d',
    'construct_kernel'
]
