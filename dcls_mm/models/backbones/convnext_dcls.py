"""ConvNeXt-dcls backbone (ConvNeXt whose depthwise 7x7 convs are DCLS convolutions).

Parameter names follow the published ConvNeXt-dcls checkpoints exactly (see the README,
section "Backbones", which lists their keys and formats), so those checkpoints load
without renaming. The trunk (stem, downsample layers, stages) is built by
:func:`build_convnext_dcls_trunk` and shared with the timm classifier in
:mod:`dcls_mm.models.classifiers`.

Loading checkpoints (the end of this module, as timm keeps ``checkpoint_filter_fn`` next
to its ConvNeXt): :func:`checkpoint_filter_fn` turns any supported checkpoint into the
state dict of a :class:`ConvNeXtDCLS` backbone or a timm ``ConvNeXtDCLSClassifier``, in
four steps:

1. find the state dict (``'model'`` / ``'state_dict'`` wrapper, ``backbone.`` prefix of
   downstream checkpoints: :func:`dcls_mm.utils.checkpoint_io.unwrap_checkpoint`);
2. bring its positions into dcls-mm's axis order, by checkpoint format
   (:data:`CHECKPOINT_FORMATS`, one policy each in :data:`POSITION_POLICIES`; ``'auto'``
   is resolved by :func:`resolve_checkpoint_format`);
3. rename or drop the keys the target model has no use for: the model's own policy,
   ``remap_checkpoint_key`` (a backbone drops the classifier's ``head`` and maps its
   final ``norm``; a classifier drops the downstream output norms ``norm{i}`` and a head
   of another size); shared positions are checked and completed per stage;
4. one shared diff-and-report step
   (:func:`dcls_mm.utils.checkpoint_io.match_state_dict`) names every unexpected,
   mis-shaped and missing key in one ``ValueError``.

Supported files (keys as published with the paper, Zenodo records 7112021 / 8029747):
classification ``{'model': {downsample_layers.*, stages.*, norm.*, head.*}}``;
downstream (mmdet/mmseg) ``{'state_dict': {'backbone.*', 'neck.*', ...}}`` with the
output norms ``backbone.norm{i}``; dcls-mm checkpoints (``{'meta': ..., 'state_dict':
...}``); the reference gaussian ConvNeXt-T (``SIG`` present, positions in the reference
package's gauss axis order); a flat state dict of any of these.
"""
from __future__ import annotations

import inspect
import re
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from mmengine.logging import print_log
from torch import Tensor, nn

from dcls_mm.ops import Dcls2d, canonical_interpolation, convert_reference_state_dict, dcls_layers
from dcls_mm.ops.kernel import WITH_SIGMA
from dcls_mm.registry import MODELS
from dcls_mm.utils.checkpoint_io import (format_keys, load_checkpoint_file, match_state_dict,
                                         pretrained_init_cfg, select_prefix, unwrap_checkpoint)

#: depths and widths per arch (the timm/ConvNeXt ones).
ARCH_SETTINGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    'atto': dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    'femto': dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
    'pico': dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
    'nano': dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    'tiny': dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    'small': dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    'base': dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    'large': dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}
#: kernel counts of the paper (dilated kernel size 17) for the published archs; other
#: archs get :func:`iso_kernel_count`.
PAPER_KERNEL_COUNTS = {'tiny': 34, 'small': 40, 'base': 40}
#: kernel size of the dense ConvNeXt depthwise conv (``dwconv_type='dense'``) and of the
#: iso-parameter comparison.
DENSE_KERNEL_SIZE = 7
#: what the blocks' depthwise conv (the module ``dwconv``) can be
DWCONV_TYPES = ('dcls', 'dense')
#: how a checkpoint stores positions (``checkpoint_format``): ``'dcls_mm'`` is our axis
#: order (``P[0]`` = height), also that of the published bilinear checkpoints;
#: ``'reference_gauss'`` the reference package's gauss/v1/max order (``P[0]`` = width);
#: ``'auto'`` decides per file (:func:`resolve_checkpoint_format`).
CHECKPOINT_FORMATS = ('auto', 'dcls_mm', 'reference_gauss')


def check_checkpoint_format(checkpoint_format: str) -> str:
    """Return ``checkpoint_format`` if it is one of :data:`CHECKPOINT_FORMATS`.

    Raises:
        ValueError: naming the accepted formats.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f'checkpoint_format must be one of {CHECKPOINT_FORMATS}, '
                         f'got {checkpoint_format!r}')
    return checkpoint_format


#: modules a model is built through: a warning names the first line outside them
_BUILDER_MODULES = ('dcls_mm.', 'timm.', 'mmengine.', 'mmdet.', 'mmseg.', 'torch.')


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel (called from :func:`resolve_dwconv_type`) that names
    the first line outside dcls_mm and the libraries that build models (the user's
    ``ConvNeXtDCLS(...)``, ``timm.create_model(...)`` or ``MODELS.build(...)`` call)."""
    frame, level = inspect.currentframe().f_back.f_back, 2
    while frame is not None and frame.f_globals.get('__name__', '').startswith(_BUILDER_MODULES):
        frame, level = frame.f_back, level + 1
    return level


def resolve_dwconv_type(dwconv_type: str, dwconv: Optional[str] = None) -> str:
    """Validate ``dwconv_type``, honouring the deprecated ``dwconv=`` spelling.

    ``dwconv`` is the name of the block's depthwise conv *module* (and of its checkpoint
    keys), so the argument choosing its type is ``dwconv_type``; ``dwconv=`` still works
    (older configs use it) with a ``DeprecationWarning``.

    Args:
        dwconv_type: ``'dcls'`` or ``'dense'``.
        dwconv: the deprecated spelling; given, it wins.

    Raises:
        ValueError: for another type.
    """
    if dwconv is not None:
        warnings.warn("dwconv=... is deprecated (dwconv names the block's conv module): "
                      'use dwconv_type=...', DeprecationWarning, stacklevel=_caller_stacklevel())
        dwconv_type = dwconv
    if dwconv_type not in DWCONV_TYPES:
        raise ValueError(f"dwconv_type must be 'dcls' or 'dense', got {dwconv_type!r}")
    return dwconv_type


def resolve_arch(arch: Union[str, dict]) -> Tuple[Optional[str], Tuple[int, ...], Tuple[int, ...]]:
    """Return ``(name or None, depths, dims)`` of an arch name or dict.

    A dict must hold ``depths`` and ``dims`` (``channels`` is accepted as an alias of
    ``dims``, like mmpretrain), four ints each.
    """
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCH_SETTINGS)} '
                             'or pass a dict with "depths" and "dims"')
        setting = ARCH_SETTINGS[arch]
        return arch, tuple(setting['depths']), tuple(setting['dims'])
    if isinstance(arch, dict):
        dims = arch.get('dims', arch.get('channels'))
        depths = arch.get('depths')
        if depths is None or dims is None:
            raise ValueError(f'an arch dict needs "depths" and "dims", got keys {sorted(arch)}')
        depths, dims = tuple(int(d) for d in depths), tuple(int(c) for c in dims)
        if len(depths) != 4 or len(dims) != 4 or min(depths + dims) < 1:
            raise ValueError(f'arch needs 4 positive depths and 4 positive dims, got '
                             f'depths={depths}, dims={dims}')
        return None, depths, dims
    raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')


def iso_kernel_count(depths: Sequence[int], dims: Sequence[int], share_positions: bool = True,
                     with_sigma: bool = False,
                     dense_kernel_size: int = DENSE_KERNEL_SIZE) -> int:
    """Largest ``kernel_count`` keeping the DCLS model's parameter count <= the dense one's.

    Only the depthwise convs differ between ConvNeXt and ConvNeXt-dcls. A stage of depth
    ``d`` and width ``C`` has ``d*C*k^2`` dense depthwise weights (``k`` =
    ``dense_kernel_size``) against ``d*C*K`` DCLS weights plus ``2*C*K`` positions (times
    ``d`` when positions are not shared, times 2 with ``SIG``); biases are the same.

    Returns:
        ``floor(sum_s d_s*C_s*k^2 / sum_s (d_s*C_s + n_pos*2*C_s*(1 if shared else d_s)))``,
        e.g. 34 for tiny and 40 for small/base with shared positions and no ``SIG``.
    """
    n_pos = 2 if with_sigma else 1
    dense = sum(d * c * dense_kernel_size ** 2 for d, c in zip(depths, dims))
    per_k = sum(d * c + n_pos * 2 * c * (1 if share_positions else d)
                for d, c in zip(depths, dims))
    count = dense // per_k
    if count < 1:
        raise ValueError('no kernel_count >= 1 keeps the parameter count <= the dense model')
    return count


def warn_above_dense_parameters(depths: Sequence[int], dims: Sequence[int], kernel_count: int,
                                dilated_kernel_size: Union[int, Tuple[int, int]],
                                interpolation: str, share_positions: bool) -> bool:
    """Warn (one line) when the DCLS depthwise convs hold more parameters than dense
    kernels of the full dilated size would: such a ``kernel_count`` defeats the method.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        kernel_count: DCLS elements per channel.
        dilated_kernel_size: int or ``(height, width)``.
        interpolation: interpolation name (``SIG`` doubles the position parameters).
        share_positions: one ``P`` (and ``SIG``) per stage instead of per block.

    Returns:
        Whether it warned.
    """
    lh, lw = ((dilated_kernel_size, ) * 2 if isinstance(dilated_kernel_size, int)
              else tuple(dilated_kernel_size))
    n_pos = 2 if canonical_interpolation(interpolation) in WITH_SIGMA else 1
    dense = sum(d * c * lh * lw for d, c in zip(depths, dims))
    dcls = sum(d * c * kernel_count + n_pos * 2 * c * kernel_count * (1 if share_positions else d)
               for d, c in zip(depths, dims))
    if dcls <= dense:
        return False
    try:
        iso = iso_kernel_count(depths, dims, share_positions, n_pos == 2)
    except ValueError:  # no count keeps this arch at iso-parameters
        iso = 'none'
    warnings.warn(f'kernel_count={kernel_count} gives the DCLS depthwise convs {dcls} '
                  f'parameters, more than dense {lh}x{lw} kernels ({dense}); '
                  f'iso-parameters with 7x7 is kernel_count={iso}', stacklevel=3)
    return True


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of ``(N, C, H, W)`` tensors ("channels first")."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with ``drop_prob == 0``)."""

    def __init__(self, drop_prob: float = 0.) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class ConvNeXtDCLSBlock(nn.Module):
    """ConvNeXt block: dwconv -> LN -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> gamma ->
    DropPath -> residual.

    Args:
        channels: block width ``C``.
        dwconv_type: ``'dcls'`` (a depthwise :class:`~dcls_mm.ops.Dcls2d`) or
            ``'dense'`` (a plain 7x7 depthwise ``nn.Conv2d``, the ConvNeXt baseline).
        kernel_count: DCLS elements per channel (``'dcls'`` only).
        dilated_kernel_size: DCLS dilated kernel size (``'dcls'`` only).
        interpolation: DCLS interpolation (``'dcls'`` only).
        drop_path: stochastic depth rate of this block.
        layer_scale_init_value: initial ``gamma``; ``<= 0`` disables layer scale.
        mlp_ratio: hidden width of the MLP relative to ``C``.
    """

    def __init__(self, channels: int, dwconv_type: str = 'dcls', kernel_count: int = 34,
                 dilated_kernel_size: Union[int, Tuple[int, int]] = 17,
                 interpolation: str = 'bilinear', drop_path: float = 0.,
                 layer_scale_init_value: float = 1e-6, mlp_ratio: int = 4, *,
                 dwconv: Optional[str] = None) -> None:
        super().__init__()
        if resolve_dwconv_type(dwconv_type, dwconv) == 'dcls':
            # 'same' keeps the residual shapes for even sizes too (odd: padding dks // 2,
            # as the published models)
            self.dwconv = Dcls2d(channels, channels, kernel_count, padding='same',
                                 dilated_kernel_size=dilated_kernel_size, groups=channels,
                                 bias=True, interpolation=interpolation)
        else:
            self.dwconv = nn.Conv2d(channels, channels, DENSE_KERNEL_SIZE,
                                    padding=DENSE_KERNEL_SIZE // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, mlp_ratio * channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * channels, channels)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale_init_value)))
        else:
            self.gamma = None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        # The one depthwise-conv call site (a fast path belongs inside the conv module).
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ConvNeXtDCLSStage(nn.Sequential):
    """A sequence of :class:`ConvNeXtDCLSBlock` of one width.

    With ``share_positions``, block 0's ``dwconv.P`` (and ``dwconv.SIG``) Parameter
    object is assigned to every block: it appears once in ``parameters()`` and under
    every ``{j}.dwconv.P`` key of ``state_dict()`` (like the published checkpoints).
    Loading checks that a state dict's repeated values are equal (``ValueError``
    otherwise) and fills the blocks it omits from the ones it has.

    Args:
        blocks: the blocks.
        share_positions: share positions (and SIG) across the blocks (DCLS blocks only).
        with_cp: run each block under ``torch.utils.checkpoint`` when training.
    """

    def __init__(self, blocks: Sequence[ConvNeXtDCLSBlock], share_positions: bool = True,
                 with_cp: bool = False) -> None:
        super().__init__(*blocks)
        self.with_cp = with_cp
        first = blocks[0].dwconv
        self.share_positions = bool(share_positions) and isinstance(first, Dcls2d)
        if self.share_positions:
            for block in blocks[1:]:
                block.dwconv.P = first.P
                if first.SIG is not None:
                    block.dwconv.SIG = first.SIG

    def shared_names(self) -> List[str]:
        """Names of the dwconv parameters shared across blocks (``[]`` if none)."""
        if not self.share_positions:
            return []
        return ['P'] + (['SIG'] if self[0].dwconv.SIG is not None else [])

    def forward(self, x: Tensor) -> Tensor:
        # channels_last keeps every op of the block copy-free: the depthwise conv (fast on
        # the CPU in this layout, and the layout the DCLS fast path returns), the NHWC
        # permute before LayerNorm/MLP, and the residual sum.
        x = x.contiguous(memory_format=torch.channels_last)
        for block in self:
            if self.with_cp and self.training and torch.is_grad_enabled():
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def expand_shared(self, state_dict: Dict[str, Tensor], prefix: str) -> None:
        """Check and complete the shared entries of ``state_dict`` in place.

        For each shared name, the ``{prefix}{j}.dwconv.{name}`` entries present must be
        equal (else ``ValueError`` naming them); absent blocks get the present value.
        """
        for name in self.shared_names():
            keys = [f'{prefix}{j}.dwconv.{name}' for j in range(len(self))]
            present = [k for k in keys if k in state_dict]
            if not present:
                continue
            ref = state_dict[present[0]]
            differ = [k for k in present[1:]
                      if state_dict[k].shape != ref.shape or not torch.equal(state_dict[k], ref)]
            if differ:
                raise ValueError(
                    f'{prefix}*.dwconv.{name} is shared by the blocks of this stage '
                    f'(share_positions=True) but the state dict holds different values: '
                    f'{differ} differ from {present[0]}. Build the model with '
                    'share_positions=False to load per-block positions.')
            for k in keys:
                if k not in state_dict:
                    state_dict[k] = ref

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Runs before the blocks load (torch and mmengine both recurse parent-first and
        # hand the children the dict mutated here).
        self.expand_shared(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def init_convnext_weights(module: nn.Module) -> None:
    """ConvNeXt(-dcls) init: trunc_normal(std .02) weights and zero biases for convs,
    linears and DCLS convs (DCLS positions keep their N(0, 0.5) clamped init)."""
    if isinstance(module, (nn.Conv2d, nn.Linear, Dcls2d)):
        nn.init.trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_convnext_dcls_trunk(depths: Sequence[int], dims: Sequence[int], in_channels: int = 3,
                              dwconv_type: str = 'dcls', kernel_count: int = 34,
                              dilated_kernel_size: Union[int, Tuple[int, int]] = 17,
                              interpolation: str = 'bilinear', share_positions: bool = True,
                              drop_path_rate: float = 0., layer_scale_init_value: float = 1e-6,
                              with_cp: bool = False, *, dwconv: Optional[str] = None
                              ) -> Tuple[nn.ModuleList, nn.ModuleList]:
    """Build ``(downsample_layers, stages)`` of a ConvNeXt(-dcls), initialised.

    ``downsample_layers[0]`` is the stem (``Conv2d(k4, s4)``, channels-first LN), the
    others are ``LN, Conv2d(k2, s2)``. See :class:`ConvNeXtDCLS` for the arguments
    (``dwconv`` is the deprecated spelling of ``dwconv_type``).
    """
    dwconv_type = resolve_dwconv_type(dwconv_type, dwconv)
    if dwconv_type == 'dcls':
        warn_above_dense_parameters(depths, dims, kernel_count, dilated_kernel_size,
                                    interpolation, share_positions)
    downsample_layers = nn.ModuleList()
    downsample_layers.append(nn.Sequential(
        nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0])))
    for i in range(1, len(dims)):
        downsample_layers.append(nn.Sequential(
            LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages = nn.ModuleList()
    start = 0
    for depth, dim in zip(depths, dims):
        blocks = [ConvNeXtDCLSBlock(dim, dwconv_type, kernel_count, dilated_kernel_size,
                                    interpolation, rates[start + j], layer_scale_init_value)
                  for j in range(depth)]
        start += depth
        stages.append(ConvNeXtDCLSStage(blocks, share_positions, with_cp))
    for module in (downsample_layers, stages):
        module.apply(init_convnext_weights)
    return downsample_layers, stages


def default_kernel_count(arch_name: Optional[str], depths, dims, share_positions: bool,
                         interpolation: str) -> int:
    """``kernel_count=None`` resolution: the paper's 34/40/40 for bilinear tiny/small/base,
    else :func:`iso_kernel_count` for this configuration (e.g. 26 for gaussian tiny with
    shared SIG, the published gaussian model's count)."""
    with_sigma = canonical_interpolation(interpolation) in WITH_SIGMA
    if arch_name in PAPER_KERNEL_COUNTS and not with_sigma:
        return PAPER_KERNEL_COUNTS[arch_name]
    return iso_kernel_count(depths, dims, share_positions, with_sigma)


@MODELS.register_module()
class ConvNeXtDCLS(BaseModule):
    """ConvNeXt-dcls backbone: ConvNeXt with DCLS depthwise convolutions.

    A PyTorch implementation of `Dilated Convolution with Learnable Spacings
    <https://arxiv.org/abs/2112.03740>`_ on `ConvNeXt <https://arxiv.org/abs/2201.03545>`_.
    Use it from any OpenMMLab config as ``type='dcls_mm.ConvNeXtDCLS'``.

    Args:
        arch (str | dict): ConvNeXt architecture. A name in :attr:`arch_settings`
            (``'atto'``, ``'femto'``, ``'pico'``, ``'nano'``, ``'tiny'``, ``'small'``,
            ``'base'``, ``'large'``) or a dict with keys ``depths`` (4 ints: blocks per
            stage) and ``dims`` (4 ints: widths; ``channels`` is accepted too).
            Defaults to ``'tiny'``.
        in_channels (int): Number of input image channels. Defaults to 3.
        dwconv_type (str): Depthwise convolution of the blocks (their ``dwconv`` module):
            ``'dcls'`` (DCLS, depthwise :class:`~dcls_mm.ops.Dcls2d`) or ``'dense'``
            (plain 7x7 depthwise conv, the ConvNeXt baseline; key ``dwconv.weight`` of
            shape ``(C, 1, 7, 7)``). Defaults to ``'dcls'``.
        dilated_kernel_size (int | tuple[int, int]): Size of the dilated kernel in which
            the positions are learned. Defaults to 17.
        kernel_count (int, optional): Number of learned elements per channel. ``None``
            means 34 for tiny and 40 for small/base (the paper's iso-parameter values) and,
            for other archs, the largest count keeping the parameter count <= the dense
            7x7 ConvNeXt of the same arch (:func:`iso_kernel_count`, which takes
            ``share_positions`` and ``SIG`` into account). Defaults to None.
        interpolation (str): DCLS interpolation: ``'bilinear'`` (``'v0'``, the published
            checkpoints), ``'bilinear_normalized'`` (``'v1'``), ``'triangle'``
            (``'max'``) or ``'gaussian'`` (``'gauss'``). Defaults to ``'bilinear'``.
        share_positions (bool): One set of positions (and SIG) per stage, shared by all
            its blocks (the paper's setting): the same ``nn.Parameter`` is every block's
            ``dwconv.P``, listed once by ``parameters()`` and repeated per block by
            ``state_dict()``. Defaults to True.
        drop_path_rate (float): Stochastic depth rate, increased linearly over the blocks.
            Defaults to 0.
        layer_scale_init_value (float): Initial value of the layer scale ``gamma``;
            ``<= 0`` disables it. Defaults to 1e-6.
        out_indices (int | Sequence[int]): Stages whose output is returned (negative
            indices allowed). Each gets a channels-first LayerNorm ``norm{i}`` (eps 1e-6).
            Defaults to ``(0, 1, 2, 3)``.
        frozen_stages (int): Freeze ``downsample_layers[:k+1]`` and ``stages[:k+1]``
            (``requires_grad=False`` and eval mode, kept across ``train()``); -1 freezes
            nothing. Defaults to -1.
        gap_before_final_norm (bool): Global-average-pool each output before its norm and
            return ``(N, C)`` features (mmpretrain semantics, for a classification trunk
            with ``out_indices=(3,)``; a classification checkpoint's final ``norm`` is then
            loaded into ``norm3``). Defaults to False.
        with_cp (bool): Run every block under ``torch.utils.checkpoint`` when training
            (saves memory, costs a second forward). Defaults to False.
        checkpoint_format (str): How ``init_cfg=dict(type='Pretrained')`` checkpoints
            store positions: ``'auto'``, ``'dcls_mm'`` (our axis order, also that of the
            published bilinear checkpoints) or ``'reference_gauss'`` (the reference
            package's gauss/v1/max order, converted on load). See
            :func:`resolve_checkpoint_format`.
            Defaults to ``'auto'``.
        init_cfg (dict | list[dict], optional): Initialization config. A
            ``dict(type='Pretrained', checkpoint=PATH[, prefix=...])`` is loaded through
            :func:`checkpoint_filter_fn` (published
            classification / downstream checkpoints, dcls-mm checkpoints). Without it,
            weights are trunc_normal(.02), biases 0, positions N(0, 0.5) clamped.
            Defaults to None.
        dwconv (str, optional): Deprecated spelling of ``dwconv_type`` (a
            ``DeprecationWarning``); given, it wins. Defaults to None.

    Example:
        >>> import torch
        >>> from dcls_mm.models import ConvNeXtDCLS
        >>> model = ConvNeXtDCLS('atto', out_indices=(1, 3)).eval()
        >>> [tuple(f.shape) for f in model(torch.rand(1, 3, 64, 64))]
        [(1, 80, 8, 8), (1, 320, 2, 2)]
    """
    arch_settings = ARCH_SETTINGS

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3,
                 dwconv_type: str = 'dcls',
                 dilated_kernel_size: Union[int, Tuple[int, int]] = 17,
                 kernel_count: Optional[int] = None, interpolation: str = 'bilinear',
                 share_positions: bool = True, drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3), frozen_stages: int = -1,
                 gap_before_final_norm: bool = False, with_cp: bool = False,
                 checkpoint_format: str = 'auto',
                 init_cfg: Optional[Union[dict, List[dict]]] = None, *,
                 dwconv: Optional[str] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch_name, self.depths, self.dims = resolve_arch(arch)
        self.dwconv_type = resolve_dwconv_type(dwconv_type, dwconv)
        self.interpolation = canonical_interpolation(interpolation)
        self.dilated_kernel_size = dilated_kernel_size
        if kernel_count is None:
            kernel_count = default_kernel_count(self.arch_name, self.depths, self.dims,
                                                share_positions, self.interpolation)
        self.kernel_count = kernel_count
        self.share_positions = share_positions
        self.checkpoint_format = check_checkpoint_format(checkpoint_format)
        self.num_stages = len(self.depths)

        if isinstance(out_indices, int):
            out_indices = [out_indices]
        if not isinstance(out_indices, Sequence) or len(out_indices) == 0:
            raise ValueError(f'out_indices must be an int or a non-empty sequence, got {out_indices!r}')
        indices = []
        for index in out_indices:
            norm_index = index + self.num_stages if index < 0 else index
            if not 0 <= norm_index < self.num_stages:
                raise ValueError(f'invalid out_indices entry {index}')
            indices.append(norm_index)
        self.out_indices = tuple(sorted(set(indices)))
        if not -1 <= frozen_stages < self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages - 1}], '
                             f'got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.gap_before_final_norm = gap_before_final_norm
        self.with_cp = with_cp

        self.downsample_layers, self.stages = build_convnext_dcls_trunk(
            self.depths, self.dims, in_channels, self.dwconv_type, kernel_count,
            dilated_kernel_size, self.interpolation, share_positions, drop_path_rate,
            layer_scale_init_value, with_cp)
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(self.dims[i]))
        self._freeze_stages()

    # --- weights ----------------------------------------------------------------------
    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=...)`` (or a list of that one
        dict) through :func:`load_pretrained`; other init_cfgs as
        :class:`mmengine.model.BaseModule` does (the default init happens in ``__init__``)."""
        cfg = pretrained_init_cfg(self.init_cfg)
        if cfg is not None:
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'),
                            map_location=cfg.get('map_location', 'cpu'),
                            checkpoint_format=self.checkpoint_format)
            self._is_init = True
            self._freeze_stages()
            return
        super().init_weights()

    def remap_checkpoint_key(self, key: str, value: Tensor) -> Optional[str]:
        """This backbone's name for a checkpoint key, or ``None`` to drop it (step 3 of
        :func:`checkpoint_filter_fn`).

        The classifier's ``head`` is dropped; its final ``norm`` becomes ``norm3`` with
        ``gap_before_final_norm`` (the same pooled-then-normed features) and is dropped
        otherwise; output norms ``norm{i}`` of stages this backbone does not return are
        dropped.

        Args:
            key: a key of the (unwrapped, prefix-stripped) checkpoint.
            value: its tensor (unused: the decision depends on the name only).
        """
        root = key.split('.', 1)[0]
        if root == 'head':
            return None
        if root == 'norm':
            if self.gap_before_final_norm and 3 in self.out_indices:
                return 'norm3' + key[len('norm'):]
            return None
        if re.fullmatch(r'norm\d+', root) and int(root[len('norm'):]) not in self.out_indices:
            return None
        return key

    def optional_checkpoint_keys(self) -> List[str]:
        """Keys a checkpoint may lack: the output norms (classification checkpoints have
        none; they keep their fresh init)."""
        return [k for k in self.state_dict() if re.match(r'norm\d+\.', k)]

    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages + 1):
            for module in (self.downsample_layers[i], self.stages[i]):
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    # --- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Args:
            x: images ``(N, in_channels, H, W)``.

        Returns:
            One tensor per ``out_indices`` entry: ``(N, dims[i], H / 2^(i+2), W / 2^(i+2))``,
            or ``(N, dims[i])`` with ``gap_before_final_norm``.
        """
        outs = []
        for i in range(self.num_stages):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                if self.gap_before_final_norm:
                    outs.append(norm(x.mean((-2, -1), keepdim=True)).flatten(1))
                else:
                    outs.append(norm(x))
        return tuple(outs)

    def dcls_convs(self) -> List[Dcls2d]:
        """All DCLS depthwise convs (one per block; shared positions repeat)."""
        return [m for _, m in dcls_layers(self)]


# --- loading checkpoints (see the module docstring) ---------------------------------------
def model_interpolation(model: nn.Module) -> Optional[str]:
    """The interpolation of ``model``'s DCLS layers when they all share one, else ``None``."""
    found = {m.interpolation for _, m in dcls_layers(model)}
    return found.pop() if len(found) == 1 else None


def resolve_checkpoint_format(checkpoint_format: str, checkpoint: dict,
                              interpolation: Optional[str] = None) -> str:
    """Resolve ``'auto'`` to ``'dcls_mm'`` or ``'reference_gauss'`` (the documented
    detector).

    * a ``meta`` dict (everything dcls-mm / mmengine writes) -> ``'dcls_mm'``;
    * no ``SIG`` entries -> ``'dcls_mm'`` (bilinear: the published ConvNeXt-dcls files,
      trained with the reference's ``v0``, store P[0] = height as dcls-mm does), except
      for a model with ``interpolation='bilinear_normalized'``: the reference package's
      ``v1`` stores P[0] = width, so a file without ``meta`` is ambiguous and raises;
    * ``SIG`` in the published layout (a ``{'model': ...}`` file without ``meta`` or
      ``state_dict``) -> ``'reference_gauss'``;
    * any other file with ``SIG`` (a bare state dict, e.g. what timm hands the filter
      after unwrapping) is ambiguous and raises rather than risk transposed kernels.

    Args:
        checkpoint_format: one of :data:`CHECKPOINT_FORMATS`.
        checkpoint: the checkpoint as read from the file (wrappers included).
        interpolation: the loading model's DCLS interpolation (canonical name), if known.

    Raises:
        ValueError: unknown format, or ``'auto'`` on a file whose layout does not tell the
            position axis order.
    """
    if check_checkpoint_format(checkpoint_format) != 'auto':
        return checkpoint_format
    state_dict, meta = unwrap_checkpoint(checkpoint)
    if meta is not None:
        return 'dcls_mm'
    if not any(k.endswith('.SIG') for k in state_dict):
        if interpolation == 'bilinear_normalized' and any(k.endswith('.P') for k in state_dict):
            raise ValueError(
                "this checkpoint has neither dcls-mm's meta nor SIG entries, and the model "
                "uses interpolation 'bilinear_normalized' (the reference package's v1, "
                'whose files store P[0] = width; dcls-mm and the published ConvNeXt-dcls '
                "files store P[0] = height): pass checkpoint_format='reference_gauss' for "
                "a file saved by the reference package (it swaps the axes) or 'dcls_mm'")
        return 'dcls_mm'
    if 'model' in checkpoint and 'state_dict' not in checkpoint:
        return 'reference_gauss'
    raise ValueError("this checkpoint has SIG entries but neither dcls-mm's meta nor the "
                     "published {'model': ...} layout, so the position axis order is "
                     "unknown: pass checkpoint_format='dcls_mm' (saved by dcls-mm) or "
                     "'reference_gauss' (saved by the reference DCLS package), e.g. "
                     "timm.create_model(..., checkpoint_format='reference_gauss')")


def _dilated_kernel_size(model: nn.Module) -> Union[int, Tuple[int, ...]]:
    sizes = [m.dilated_kernel_size for _, m in dcls_layers(model) if isinstance(m, Dcls2d)]
    return sizes[0] if sizes else 1


#: per checkpoint format, how its positions become dcls-mm's (the key names are the same)
POSITION_POLICIES: Dict[str, Callable[[Dict[str, Tensor], nn.Module], Dict[str, Tensor]]] = {
    'dcls_mm': lambda state_dict, model: state_dict,
    'reference_gauss': lambda state_dict, model: OrderedDict(
        convert_reference_state_dict(state_dict, _dilated_kernel_size(model))),
}


def checkpoint_filter_fn(checkpoint: dict, model: nn.Module,
                         checkpoint_format: Optional[str] = None,
                         prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """Remap a ConvNeXt-dcls checkpoint to ``model``'s state dict (timm filter signature).

    Used by ``ConvNeXtDCLS.init_weights`` (``init_cfg=dict(type='Pretrained')``), by the
    converter (:mod:`dcls_mm.models.convert`) and by timm's ``pretrained=True``.

    Args:
        checkpoint: a loaded checkpoint (wrapped or flat, see the module docstring; timm
            passes the state dict it unwrapped).
        model: a :class:`ConvNeXtDCLS` backbone or a
            :class:`~dcls_mm.models.classifiers.ConvNeXtDCLSClassifier` (any device,
            ``meta`` included: only names and shapes are used), or any model with the
            same two methods ``remap_checkpoint_key`` and ``optional_checkpoint_keys``.
        checkpoint_format: one of :data:`CHECKPOINT_FORMATS`; ``None`` uses
            ``model.checkpoint_format`` (default ``'auto'``).
        prefix: keep only the keys starting with it and strip it; ``None``: ``'backbone.'``
            when the checkpoint has such keys (downstream checkpoints), else nothing.

    Returns:
        A state dict whose keys and shapes are ``model``'s. For a backbone, the output
        norms ``norm{i}`` may be absent (classification checkpoints have none; they keep
        their fresh init, a message is logged). For a classifier, ``head.*`` of another
        shape (another ``num_classes``) is dropped (timm then re-initialises the head).

    Raises:
        ValueError: listing unknown keys, shape mismatches and missing keys, or if a
            stage with shared positions gets different positions across its blocks.
    """
    if checkpoint_format is None:
        checkpoint_format = getattr(model, 'checkpoint_format', 'auto')
    fmt = resolve_checkpoint_format(checkpoint_format, checkpoint, model_interpolation(model))
    state_dict = select_prefix(unwrap_checkpoint(checkpoint)[0], prefix)
    state_dict = POSITION_POLICIES[fmt](state_dict, model)

    adapted, dropped = OrderedDict(), []
    for key, value in state_dict.items():
        new_key = model.remap_checkpoint_key(key, value)
        if new_key is None:
            dropped.append(key)
        else:
            adapted[new_key] = value
    # Shared positions: check the per-block copies, fill omitted ones.
    for i, stage in enumerate(getattr(model, 'stages', [])):
        if hasattr(stage, 'expand_shared'):
            stage.expand_shared(adapted, f'stages.{i}.')

    kept_init = match_state_dict(
        adapted, model.state_dict(),
        f'checkpoint does not match {type(model).__name__} (checkpoint_format={fmt!r}):',
        model.optional_checkpoint_keys())
    if dropped:
        print_log(f'ConvNeXt-dcls checkpoint: ignored {len(dropped)} keys not used by '
                  f'{type(model).__name__}: {format_keys(dropped, 8)}', logger='current')
    if kept_init:
        print_log(f'ConvNeXt-dcls checkpoint: not in the checkpoint, kept at their init: '
                  f'{format_keys(kept_init, 8)}', logger='current')
    return adapted


def load_pretrained(model: nn.Module, filename: str, prefix: Optional[str] = None,
                    map_location='cpu', checkpoint_format: Optional[str] = None) -> List[str]:
    """Read ``filename`` safely, remap it with :func:`checkpoint_filter_fn` and load it.

    Args:
        model: as for :func:`checkpoint_filter_fn`.
        filename: the checkpoint (read by
            :func:`dcls_mm.utils.checkpoint_io.load_checkpoint_file`).
        prefix: as for :func:`checkpoint_filter_fn`.
        map_location: where to put the tensors.
        checkpoint_format: as for :func:`checkpoint_filter_fn`.

    Returns:
        The model keys left at their initial values (fresh output norms / head).
    """
    checkpoint = load_checkpoint_file(filename, map_location=map_location)
    state_dict = checkpoint_filter_fn(checkpoint, model, checkpoint_format, prefix)
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:  # cannot happen after the filter; keep loading honest
        raise ValueError(f'unexpected keys: {result.unexpected_keys}')
    print_log(f'loaded ConvNeXt-dcls weights from {filename}', logger='current')
    return list(result.missing_keys)
