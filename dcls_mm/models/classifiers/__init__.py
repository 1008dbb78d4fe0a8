"""timm classifiers (registered in timm's model registry on import)."""
from .timm_convnext_dcls import ConvNeXtDCLSClassifier

__all__ = ['ConvNeXtDCLSClassifier']
