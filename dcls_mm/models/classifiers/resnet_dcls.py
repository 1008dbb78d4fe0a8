"""ResNet-50-dcls (the DCLS paper's first experiment) registered in timm.

``import dcls_mm.models`` registers ``resnet50_dcls``: timm's ResNet-50 whose 16
bottleneck 3x3 convs (``layer*.conv2``) are DCLS convolutions with dilated kernel 7 at
iso-parameters, one set of positions per stage (``layer1`` .. ``layer4``), bilinear
interpolation. The stem (7x7) and the 1x1 convs stay dense. Any of the conversion
arguments of :func:`dcls_mm.ops.convert_to_dcls` can be overridden::

    model = timm.create_model('resnet50_dcls')                       # iso-parameters
    model = timm.create_model('resnet50_dcls', init='exact', pretrained=True,
                              pretrained_cfg_overlay=dict(file='resnet50_dense.pth'))

``pretrained=True`` reads ``pretrained_cfg_overlay=dict(file=...)`` (no weights are
published): a DCLS checkpoint of this model, or a dense timm/torchvision ResNet-50
state dict, whose 3x3 kernels are mapped exactly (:func:`dcls_mm.ops.convert_dense_state_dict`,
which needs one element per tap: ``init='exact'`` implies it, as timm drops
``kernel_count=None``).
"""
from __future__ import annotations

from typing import Set

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from dcls_mm.ops import convert_dense_state_dict, convert_to_dcls, dcls_position_parameters

__all__ = ['RESNET50_DCLS_CONVERSION', 'ResNetDCLS', 'resnet50_dcls']

#: the paper's ResNet-50-dcls: every bottleneck 3x3 conv, dilated kernel 7,
#: iso-parameters with positions shared per stage
RESNET50_DCLS_CONVERSION = dict(
    dilated_kernel_size=7, kernel_count='iso', interpolation='bilinear',
    select='layer*.conv2', init='random',
    share_positions=['layer1.*', 'layer2.*', 'layer3.*', 'layer4.*'])


class ResNetDCLS(ResNet):
    """timm's ResNet (to be converted by :func:`dcls_mm.ops.convert_to_dcls`) whose
    ``no_weight_decay()`` names the DCLS positions, as the paper trains them (timm's
    optimizer factory only exempts 1-D parameters by itself)."""

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {name for name, _ in dcls_position_parameters(self)}


def _filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's pretrained filter: dense 3x3 kernels mapped exactly onto the DCLS layers."""
    return convert_dense_state_dict(model, state_dict)


def _create(variant: str, pretrained: bool, conversion: dict, **kwargs) -> nn.Module:
    given = {key: kwargs.pop(key) for key in list(conversion) if key in kwargs}
    if given.get('init') == 'exact' and 'kernel_count' not in given:
        # timm.create_model drops None kwargs, so kernel_count=None cannot be passed:
        # an exact init implies one element per tap
        given['kernel_count'] = None
    conversion.update(given)

    def build(**model_kwargs) -> nn.Module:
        return convert_to_dcls(ResNetDCLS(**model_kwargs), **conversion)

    return build_model_with_cfg(build, variant, pretrained, pretrained_filter_fn=_filter,
                                **kwargs)


default_cfgs = generate_default_cfgs({
    'resnet50_dcls': {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'test_input_size': (3, 224, 224), 'test_crop_pct': 0.875,
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD, 'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:2112.03740',
        'paper_name': 'Dilated Convolution with Learnable Spacings'},
})


@register_model
def resnet50_dcls(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-50-dcls: bottleneck 3x3 convs -> DCLS (dilated kernel 7, iso-parameters,
    positions shared per stage). Conversion arguments of
    :func:`dcls_mm.ops.convert_to_dcls` may be passed to override
    :data:`RESNET50_DCLS_CONVERSION`."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create('resnet50_dcls', pretrained, dict(RESNET50_DCLS_CONVERSION),
                   **dict(model_args, **kwargs))
