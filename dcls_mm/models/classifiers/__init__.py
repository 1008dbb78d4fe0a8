"""timm classifiers (registered in timm's model registry on import)."""
from .resnet_dcls import resnet50_dcls
from .timm_convnext_dcls import ConvNeXtDCLSClassifier

__all__ = ['ConvNeXtDCLSClassifier', 'resnet50_dcls']
