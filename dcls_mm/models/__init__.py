"""dcls_mm.models: ConvNeXt-dcls backbone (``MODELS`` registry, scope ``dcls_mm``),
checkpoint remapping, and timm classifiers ``convnext_dcls_{tiny,small,base}``.

Importing this package registers the backbone; if timm is installed it also registers
the timm models.
"""
from .backbones import (ARCH_SETTINGS, ConvNeXtDCLS, ConvNeXtDCLSBlock, ConvNeXtDCLSStage,
                        DCLSConverted, LayerNorm2d, build_convnext_dcls_trunk, iso_kernel_count)
from .checkpoint import (checkpoint_filter_fn, infer_backbone_kwargs, load_checkpoint_file,
                         load_pretrained, use_checked_checkpoint_loader)

__all__ = [
    'ConvNeXtDCLS', 'ConvNeXtDCLSBlock', 'ConvNeXtDCLSStage', 'LayerNorm2d', 'ARCH_SETTINGS',
    'build_convnext_dcls_trunk', 'iso_kernel_count', 'checkpoint_filter_fn',
    'infer_backbone_kwargs', 'load_checkpoint_file', 'load_pretrained',
    'use_checked_checkpoint_loader', 'DCLSConverted'
]

# torch >= 2.6 loads with weights_only=True, which cannot read mmengine's own training
# checkpoints: importing dcls-mm (as our configs do through custom_imports, also under
# `mim train` and mmdet/mmseg's tools) makes mmengine use the checked loader.
use_checked_checkpoint_loader()

try:
    import timm  # noqa: F401
except ImportError:  # timm is optional for the backbone
    pass
else:
    from .classifiers import ConvNeXtDCLSClassifier  # noqa: F401  (registers timm models)
    __all__.append('ConvNeXtDCLSClassifier')
