"""ConvNeXt-dcls ImageNet classifiers registered in timm.

``import dcls_mm.models`` registers ``convnext_dcls_tiny``, ``convnext_dcls_small`` and
``convnext_dcls_base`` so that::

    model = timm.create_model('convnext_dcls_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file='convnext_dcls_tiny_1k_224_ema.pth'))

builds the classifier with the published key names (``downsample_layers``, ``stages``,
``norm``, ``head``) and loads a published (or dcls-mm) checkpoint through
:func:`dcls_mm.models.backbones.convnext_dcls.checkpoint_filter_fn`. timm unwraps the
file before filtering, so the reference gaussian file also needs
``checkpoint_format='reference_gauss'`` (and its architecture: ``interpolation='gaussian',
dilated_kernel_size=23, kernel_count=26``). ``checkpoint_path=`` also works for files
in dcls-mm axis order (the published bilinear ones), but it bypasses the filter.

The classifiers answer timm's model API like timm's own ``convnext_*``: every
``global_pool`` that ``convnext`` takes (``''`` keeps the map: a 1x1 head per pixel),
``features_only=True`` / ``out_indices`` (through ``forward_intermediates``, timm's
``'getter'`` feature class; ``'hook'`` and ``'fx'`` work too), ``forward_intermediates``,
``prune_intermediate_layers``, ``set_grad_checkpointing``, ``group_matcher`` (layer-wise
lr decay) and ``no_weight_decay`` (the DCLS positions). torch.fx traces them (each DCLS
layer is one node), ``torch.jit.script`` refuses them with one line naming
``torch.compile`` / ``torch.export``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Set, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ..backbones.convnext_dcls import (build_convnext_dcls_trunk, check_checkpoint_format,
                                       checkpoint_filter_fn, default_kernel_count,
                                       resolve_arch, resolve_dwconv_type)
from dcls_mm.ops import canonical_interpolation, dcls_position_parameters

__all__ = ['ConvNeXtDCLSClassifier']


def make_global_pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's global pooling of ``pool_type``, as timm's ConvNeXt head accepts it.

    Args:
        pool_type: ``'avg'``, ``'max'``, ``'avgmax'``, the ``'fast*'`` variants, or ``''``
            (no pooling).

    Raises:
        ValueError: for an unknown type, or ``'catavgmax'`` (it doubles the pooled width;
            timm's ConvNeXt refuses it too).
    """
    if not isinstance(pool_type, str):
        raise ValueError(f'global_pool must be a str, got {pool_type!r}')
    try:
        pool = SelectAdaptivePool2d(pool_type=pool_type)
    except AssertionError:
        pool = None
    if pool is None or pool.feat_mult() != 1:
        raise ValueError(f"global_pool={pool_type!r} is not supported; use 'avg', 'max', "
                         "'avgmax', a 'fast' variant of these, or '' (no pooling)")
    return pool


class ConvNeXtDCLSClassifier(nn.Module):
    """ConvNeXt-dcls image classifier (trunk + global pool + LayerNorm + Linear).

    Args:
        arch: arch name or dict, as in :class:`~dcls_mm.models.ConvNeXtDCLS`.
        in_chans: input channels (timm name).
        num_classes: classes of the head; 0 for no head (``head`` is an ``Identity``).
        global_pool: timm pooling type (see :func:`make_global_pool`). With ``''`` the
            norm and the head run on every pixel: ``(N, num_classes, H, W)`` outputs,
            like timm's ConvNeXt (whose head is then a 1x1 conv; here the same
            ``Linear``, so state dicts do not depend on the pooling).
        output_stride: only 32 (DCLS convolutions have no dilation to trade stride for).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth rate (linear over the blocks).
        layer_scale_init_value: initial layer scale ``gamma``.
        head_init_scale: multiplies the head's initial weights and bias.
        dwconv_type: ``'dcls'`` or ``'dense'``, as in :class:`~dcls_mm.models.ConvNeXtDCLS`.
        dilated_kernel_size: as in :class:`~dcls_mm.models.ConvNeXtDCLS`.
        kernel_count: as in :class:`~dcls_mm.models.ConvNeXtDCLS`.
        interpolation: as in :class:`~dcls_mm.models.ConvNeXtDCLS`.
        share_positions: as in :class:`~dcls_mm.models.ConvNeXtDCLS`.
        checkpoint_format: position axis order of the pretrained file, see
            :data:`~dcls_mm.models.backbones.convnext_dcls.CHECKPOINT_FORMATS`.
    """

    def __init__(self, arch: Union[str, dict] = 'tiny', in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = 'avg', output_stride: int = 32,
                 drop_rate: float = 0., drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.,
                 dwconv_type: str = 'dcls', dilated_kernel_size: int = 17,
                 kernel_count: Optional[int] = None, interpolation: str = 'bilinear',
                 share_positions: bool = True, checkpoint_format: str = 'auto', *,
                 dwconv: Optional[str] = None) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f'output_stride={output_stride} is not supported, only 32 '
                             '(DCLS convolutions have no dilation)')
        check_checkpoint_format(checkpoint_format)
        arch_name, depths, dims = resolve_arch(arch)
        interpolation = canonical_interpolation(interpolation)
        if kernel_count is None:
            kernel_count = default_kernel_count(arch_name, depths, dims, share_positions,
                                                interpolation)
        self.kernel_count = kernel_count
        self.checkpoint_format = checkpoint_format
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.downsample_layers, self.stages = build_convnext_dcls_trunk(
            depths, dims, in_chans, resolve_dwconv_type(dwconv_type, dwconv), kernel_count,
            dilated_kernel_size, interpolation, share_positions, drop_path_rate,
            layer_scale_init_value)
        self.global_pool = make_global_pool(global_pool)
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
        """A trunc_normal(.02) ``Linear(num_features, num_classes)``, or an ``Identity``.

        Args:
            num_classes: classes; ``<= 0`` for no head.
        """
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(head.weight, std=.02)
        nn.init.zeros_(head.bias)
        return head

    # checkpoint key policy (step 3 of checkpoint_filter_fn) ----------------------------
    def remap_checkpoint_key(self, key: str, value: Tensor) -> Optional[str]:
        """This classifier's name for a checkpoint key, or ``None`` to drop it.

        Downstream output norms ``norm{i}`` are dropped, and so is a ``head`` this model
        cannot take (another ``num_classes``, or none): timm then keeps the fresh head.

        Args:
            key: a key of the (unwrapped, prefix-stripped) checkpoint.
            value: its tensor (its shape decides for the head).
        """
        root, _, rest = key.partition('.')
        if re.fullmatch(r'norm\d+', root):
            return None
        if root == 'head':
            param = dict(self.head.named_parameters()).get(rest)
            if param is None or param.shape != value.shape:
                return None
        return key

    def optional_checkpoint_keys(self) -> List[str]:
        """Keys a checkpoint may lack: the head (a backbone-only file)."""
        return [f'head.{name}' for name, _ in self.head.named_parameters()]

    # timm model API -------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Regexes grouping the parameters by depth (timm's layer-wise lr decay).

        The groups are timm's ConvNeXt ones under the published key names: the stem
        (``downsample_layers.0``), then stage by stage the downsampling layer (with the
        stage's first block) and each block; the final norm and head come last.

        Args:
            coarse: one group per stage instead of per block.
        """
        return dict(
            stem=r'^downsample_layers\.0\.',
            blocks=r'^(?:downsample_layers|stages)\.(\d+)' if coarse else [
                (r'^downsample_layers\.(\d+)', (0,)),
                (r'^stages\.(\d+)\.(\d+)\.', None),
            ])

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Names of the DCLS positions (``P``, and ``SIG``): the paper trains them without
        weight decay (1-D parameters are excluded by timm's optimizer factory anyway)."""
        return {name for name, _ in dcls_position_parameters(self)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Run every block under ``torch.utils.checkpoint`` when training (or not).

        Args:
            enable: on or off.
        """
        for stage in self.stages:
            stage.with_cp = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final ``Linear`` (an ``Identity`` without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None,
                         reset_other: bool = False) -> None:
        """Replace the head, as timm's ConvNeXt does.

        Args:
            num_classes: classes of the new head; 0 for none.
            global_pool: new pooling type (see :func:`make_global_pool`); ``None`` keeps it.
            reset_other: also drop the final LayerNorm (replaced by an ``Identity``).
        """
        if global_pool is not None:
            self.global_pool = make_global_pool(global_pool).train(self.training)
        if reset_other:
            self.norm = nn.Identity()
        self.num_classes = num_classes
        self.head = self._make_head(num_classes).train(self.training)
        self.head_hidden_size = self.num_features

    def forward_intermediates(
            self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
            intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs, as timm's ConvNeXt returns them.

        Args:
            x: images ``(N, in_chans, H, W)``.
            indices: the last ``n`` stages if an int, all if ``None``, else these stages
                (negative ones count from the end).
            norm: accepted for timm's API; no effect (the final LayerNorm runs after the
                pooling, in the head, as in timm's ConvNeXt whose ``norm_pre`` is an
                ``Identity``).
            stop_early: stop after the last stage asked for.
            output_fmt: only ``'NCHW'``.
            intermediates_only: return only the intermediates.

        Returns:
            The list of ``(N, C_i, H / 2^(i+2), W / 2^(i+2))`` stage outputs, or
            ``(final features, that list)``.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1 if not stop_early else max_index
        intermediates = []
        for i in range(last + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one in ``indices`` (and the head), as timm's
        ConvNeXt does.

        Args:
            indices: stages to keep available, as in :meth:`forward_intermediates`.
            prune_norm: accepted for timm's API (the final norm belongs to the head).
            prune_head: drop the head (pooling, norm and classifier) even if the last
                stage stays.

        Returns:
            The absolute indices of ``indices``.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            # the head is sized for the last stage, so it goes with it
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Last stage's output ``(N, C, H / 32, W / 32)``.

        Args:
            x: images ``(N, in_chans, H, W)``.
        """
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, LayerNorm, dropout, head.

        Args:
            x: :meth:`forward_features` output ``(N, C, H, W)``.
            pre_logits: stop before the head.

        Returns:
            ``(N, classes)`` (``(N, C)`` with ``pre_logits``); without pooling the same
            per pixel, ``(N, classes | C, H, W)``.
        """
        pooled = not self.global_pool.is_identity()
        x = self.global_pool(x)
        # the LayerNorm and the Linear act on the channels: a (N, C) vector after
        # pooling, the channels-last view of every pixel without it
        x = x.flatten(1) if pooled else x.permute(0, 2, 3, 1)
        x = self.head_drop(self.norm(x))
        if not pre_logits:
            x = self.head(x)
        return x if pooled else x.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (see :meth:`forward_head` for their shape).

        Args:
            x: images ``(N, in_chans, H, W)``.
        """
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        # the published models were evaluated at 224 only (crop 0.875)
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'test_input_size': (3, 224, 224), 'test_crop_pct': 0.875,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN,
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
    """Build ``variant`` through timm's builder (pretrained file, features_only).

    Args:
        variant: registered name.
        pretrained: load ``pretrained_cfg_overlay=dict(file=...)`` through
            :func:`~dcls_mm.models.backbones.convnext_dcls.checkpoint_filter_fn`.
        **kwargs: :class:`ConvNeXtDCLSClassifier` and timm builder arguments.
    """
    feature_cls = kwargs.get('feature_cls')
    if (kwargs.get('features_only') and isinstance(feature_cls, str)
            and feature_cls.lower() in ('list', 'dict')):
        # those rebuild the model as one sequence of its children, and the published
        # key names keep the downsampling layers apart from the stages
        raise ValueError(f"feature_cls={feature_cls!r} is not supported by {variant}; use "
                         "'getter' (the default), 'hook' or 'fx'")
    return build_model_with_cfg(ConvNeXtDCLSClassifier, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
                                **kwargs)


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
