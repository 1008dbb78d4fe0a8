"""dcls_mm.models: ConvNeXt-dcls backbone (``MODELS`` registry, scope ``dcls_mm``),
checkpoint remapping and conversion, and timm classifiers ``convnext_dcls_{tiny,small,base}``.

Importing this package registers the backbone; if timm is installed it also registers
the timm models. It does not change how mmengine reads checkpoints: that is
:func:`dcls_mm.engine.register_checkpoint_loader`, made by ``import dcls_mm.engine``.
"""
from dcls_mm.utils.checkpoint_io import load_checkpoint_file

from .backbones import (ARCH_SETTINGS, ConvNeXtDCLS, ConvNeXtDCLSBlock, ConvNeXtDCLSStage,
                        DCLSConverted, LayerNorm2d, build_convnext_dcls_trunk, iso_kernel_count)
from .backbones.convnext_dcls import (CHECKPOINT_FORMATS, checkpoint_filter_fn, load_pretrained,
                                      resolve_checkpoint_format)
from .convert import convert_convnext_dcls_checkpoint, infer_backbone_kwargs

__all__ = [
    'ConvNeXtDCLS', 'ConvNeXtDCLSBlock', 'ConvNeXtDCLSStage', 'LayerNorm2d', 'ARCH_SETTINGS',
    'build_convnext_dcls_trunk', 'iso_kernel_count', 'checkpoint_filter_fn',
    'CHECKPOINT_FORMATS', 'resolve_checkpoint_format', 'infer_backbone_kwargs',
    'convert_convnext_dcls_checkpoint', 'load_checkpoint_file', 'load_pretrained',
    'DCLSConverted'
]

try:
    import timm  # noqa: F401
except ImportError:  # timm is optional for the backbone
    pass
else:
    from .classifiers import ConvNeXtDCLSClassifier  # noqa: F401  (registers timm models)
    __all__.append('ConvNeXtDCLSClassifier')
