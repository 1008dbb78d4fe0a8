"""Backbones registered in ``dcls_mm.registry.MODELS``."""
from .convnext_dcls import (ARCH_SETTINGS, ConvNeXtDCLS, ConvNeXtDCLSBlock, ConvNeXtDCLSStage,
                            LayerNorm2d, build_convnext_dcls_trunk, iso_kernel_count)
from .dcls_converted import DCLSConverted, load_converted_checkpoint

__all__ = ['ConvNeXtDCLS', 'ConvNeXtDCLSBlock', 'ConvNeXtDCLSStage', 'LayerNorm2d',
           'ARCH_SETTINGS', 'build_convnext_dcls_trunk', 'iso_kernel_count', 'DCLSConverted',
           'load_converted_checkpoint']
