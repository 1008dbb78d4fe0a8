"""ConvNeXt-dcls ImageNet classifiers registered in timm.

``import dcls_mm.models`` registers ``convnext_dcls_tiny``, ``convnext_dcls_small`` and
``convnext_dcls_base`` so that::

    model = timm.create_model('convnext_dcls_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file='convnext_dcls_tiny_1k_224_ema.pth'))

builds the classifier with the published key names (``downsample_layers``, ``stages``,
``norm``, ``head``) and loads a published (or dcls-mm) checkpoint through
:func:`dcls_mm.models.checkpoint.checkpoint_filter_fn`. ``checkpoint_path=`` also works
for files in dcls-mm axis order (the published bilinear ones), but it bypasses the
filter: reference gaussian files need ``pretrained_cfg_overlay`` (or the converter).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..backbones.convnext_dcls import (build_convnext_dcls_trunk, default_kernel_count,
                                       resolve_arch)
from ..checkpoint import CHECKPOINT_FORMATS, checkpoint_filter_fn
from dcls_mm.ops import canonical_interpolation

__all__ = ['ConvNeXtDCLSClassifier']


class ConvNeXtDCLSClassifier(nn.Module):
    """ConvNeXt-dcls image classifier (trunk + global average pool + LayerNorm + Linear).

    Args:
        arch: arch name or dict, as in :class:`~dcls_mm.models.ConvNeXtDCLS`.
        in_chans: input channels (timm name).
        num_classes: classes of the head; 0 for no head (``head`` is an ``Identity``).
        global_pool: only ``'avg'`` is supported.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth rate (linear over the blocks).
        layer_scale_init_value: initial layer scale ``gamma``.
        head_init_scale: multiplies the head's initial weights and bias.
        dwconv, dilated_kernel_size, kernel_count, interpolation, share_positions: as in
            :class:`~dcls_mm.models.ConvNeXtDCLS`.
        checkpoint_format: used by the pretrained filter, see
            :mod:`dcls_mm.models.checkpoint`.
    """

    def __init__(self, arch: Union[str, dict] = 'tiny', in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = 'avg', drop_rate: float = 0.,
                 drop_path_rate: float = 0., layer_scale_init_value: float = 1e-6,
                 head_init_scale: float = 1., dwconv: str = 'dcls',
                 dilated_kernel_size: int = 17, kernel_count: Optional[int] = None,
                 interpolation: str = 'bilinear', share_positions: bool = True,
                 checkpoint_format: str = 'auto') -> None:
        super().__init__()
        if global_pool != 'avg':
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f'checkpoint_format must be one of {CHECKPOINT_FORMATS}')
        arch_name, depths, dims = resolve_arch(arch)
        interpolation = canonical_interpolation(interpolation)
        if kernel_count is None:
            kernel_count = default_kernel_count(arch_name, depths, dims, share_positions,
                                                interpolation)
        self.kernel_count = kernel_count
        self.checkpoint_format = checkpoint_format
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.downsample_layers, self.stages = build_convnext_dcls_trunk(
            depths, dims, in_chans, dwconv, kernel_count, dilated_kernel_size, interpolation,
            share_positions, drop_path_rate, layer_scale_init_value)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)
        self.feature_info = [dict(num_chs=c, reduction=2 ** (i + 2), module=f'stages.{i}')
                             for i, c in enumerate(dims)]

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(head.weight, std=.02)
        nn.init.zeros_(head.bias)
        return head

    # timm model API -------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, 'avg'):
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.with_cp = enable

    def forward_features(self, x: Tensor) -> Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x.mean((-2, -1)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD, 'first_conv': 'downsample_layers.0.0',
        'classifier': 'head', 'license': 'mit',
        'paper_ids': 'arXiv:2112.03740', 'paper_name': 'Dilated Convolution with Learnable Spacings',
        'origin_url': 'https://zenodo.org/record/7112021', **kwargs}


default_cfgs = generate_default_cfgs({
    # The published files cannot be downloaded automatically: give the local file with
    # pretrained_cfg_overlay=dict(file=PATH).
    'convnext_dcls_tiny.in1k': _cfg(),
    'convnext_dcls_small.in1k': _cfg(),
    'convnext_dcls_base.in1k': _cfg(),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXtDCLSClassifier:
    if kwargs.get('features_only'):
        raise ValueError('features_only is not supported; use dcls_mm.models.ConvNeXtDCLS')
    return build_model_with_cfg(ConvNeXtDCLSClassifier, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def convnext_dcls_tiny(pretrained: bool = False, **kwargs) -> ConvNeXtDCLSClassifier:
    """ConvNeXt-T-dcls (dilated kernel 17, 34 elements, ImageNet-1k 82.5 top-1)."""
    return _create('convnext_dcls_tiny', pretrained, **dict(dict(arch='tiny'), **kwargs))


@register_model
def convnext_dcls_small(pretrained: bool = False, **kwargs) -> ConvNeXtDCLSClassifier:
    """ConvNeXt-S-dcls (dilated kernel 17, 40 elements, ImageNet-1k 83.7 top-1)."""
    return _create('convnext_dcls_small', pretrained, **dict(dict(arch='small'), **kwargs))


@register_model
def convnext_dcls_base(pretrained: bool = False, **kwargs) -> ConvNeXtDCLSClassifier:
    """ConvNeXt-B-dcls (dilated kernel 17, 40 elements, ImageNet-1k 84.1 top-1)."""
    return _create('convnext_dcls_base', pretrained, **dict(dict(arch='base'), **kwargs))
