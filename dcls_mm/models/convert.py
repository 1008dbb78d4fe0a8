"""Converting ConvNeXt-dcls checkpoints to clean dcls-mm backbone checkpoints.

The library side of ``tools/model_converters/convert_convnext_dcls.py``: infer the
architecture from the weights (:func:`infer_backbone_kwargs`), check the dilated kernel
size against the stored positions (:func:`check_dilated_kernel_size`), remap with
:func:`~dcls_mm.models.backbones.convnext_dcls.checkpoint_filter_fn` and write
``{'meta': ..., 'state_dict': ...}`` (:func:`convert_convnext_dcls_checkpoint`).

Reads a published classification checkpoint (``{'model': ...}``), a published
downstream one (``{'state_dict': {'backbone.*', ...}}``), the reference gaussian
ConvNeXt-T, or a dcls-mm checkpoint; writes the backbone keys of
:class:`~dcls_mm.models.ConvNeXtDCLS` (positions in dcls-mm axis order; ``norm{i}``
only if the source has them), to be loaded with
``init_cfg=dict(type='Pretrained', checkpoint='...pth')``.
"""
from __future__ import annotations

import math
import os.path as osp
import re
from collections import Counter
from typing import Dict, Optional

import torch
from torch import Tensor

from dcls_mm.utils.checkpoint_io import load_checkpoint_file, select_prefix, unwrap_checkpoint
from dcls_mm.utils.fileio import atomic_open

from .backbones.convnext_dcls import (ConvNeXtDCLS, checkpoint_filter_fn, model_interpolation,
                                      resolve_checkpoint_format)

__all__ = ['DCLS_MM_META_KEY', 'infer_backbone_kwargs', 'check_dilated_kernel_size',
           'convert_convnext_dcls_checkpoint']

#: ``meta`` marker written by the converter.
DCLS_MM_META_KEY = 'dcls_mm_checkpoint'
#: dilated kernel size of the published bilinear models (the published gaussian one: 23)
PUBLISHED_BILINEAR_DILATED_KERNEL_SIZE = 17


def _trunk(checkpoint: dict) -> Dict[str, Tensor]:
    """The backbone keys of a checkpoint (wrapper and ``backbone.`` prefix removed)."""
    state_dict, _ = unwrap_checkpoint(checkpoint)
    return select_prefix(state_dict, None)


def infer_backbone_kwargs(checkpoint: dict) -> dict:
    """Guess :class:`~dcls_mm.models.ConvNeXtDCLS` constructor arguments from the weights.

    Every key that carries a quantity votes for it, so one damaged tensor cannot change
    the inferred architecture (it then shows up alone in the filter's report instead of
    as dozens of shape mismatches).

    Args:
        checkpoint: a loaded checkpoint, wrapped or flat.

    Returns:
        ``arch`` (``depths``/``dims`` dict), ``in_channels``, ``dwconv_type``, and for
        DCLS ``kernel_count``, ``share_positions`` and ``interpolation='gaussian'`` when
        ``SIG`` is present (pass ``interpolation`` yourself for ``'triangle'``);
        ``layer_scale_init_value=0.`` without layer scale. ``dilated_kernel_size``
        cannot be inferred from weights (see :func:`check_dilated_kernel_size`).

    Raises:
        ValueError: naming the quantity that cannot be inferred and the keys it needs.
    """
    sd = _trunk(checkpoint)

    def majority(pattern: str, size, what: str, what_keys: str) -> int:
        values = [size(v) for k, v in sd.items() if re.fullmatch(pattern, k)]
        if not values:
            raise ValueError(f'cannot infer {what}: the checkpoint has no {what_keys} '
                             '(not a ConvNeXt-dcls checkpoint, or an incomplete one)')
        return Counter(values).most_common(1)[0][0]

    depths, dims = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in sd for m in [re.match(rf'stages\.{i}\.(\d+)\.', k)] if m}
        if not blocks:
            raise ValueError(f'no stages.{i}.* keys: not a ConvNeXt-dcls checkpoint')
        depths.append(max(blocks) + 1)
        dims.append(majority(rf'stages\.{i}\.\d+\.(norm\.weight|norm\.bias|dwconv\.bias|gamma|'
                             r'pwconv2\.bias)', lambda v: int(v.shape[0]),
                             f'the width of stage {i}', f'stages.{i}.*.norm/dwconv/gamma key'))
    kwargs = dict(arch=dict(depths=depths, dims=dims),
                  in_channels=majority(r'downsample_layers\.0\.0\.weight',
                                       lambda v: int(v.shape[1]), 'the input channels',
                                       "key 'downsample_layers.0.0.weight' (the stem)"))
    dw_pattern = r'stages\.\d+\.\d+\.dwconv\.weight'
    dw_keys = "'stages.*.*.dwconv.weight' key"
    if majority(dw_pattern, lambda v: v.dim(), 'the depthwise convolution type', dw_keys) == 4:
        kwargs['dwconv_type'] = 'dense'
    else:
        kwargs['dwconv_type'] = 'dcls'
        kwargs['kernel_count'] = majority(dw_pattern, lambda v: int(v.shape[-1]),
                                          'the kernel count', dw_keys)
        if any(k.endswith('.dwconv.SIG') for k in sd):
            kwargs['interpolation'] = 'gaussian'
        shared = True
        for i, depth in enumerate(depths):
            ps = [sd.get(f'stages.{i}.{j}.dwconv.P') for j in range(depth)]
            ps = [p for p in ps if p is not None]
            if any(p.shape != ps[0].shape or not torch.equal(p, ps[0]) for p in ps[1:]):
                shared = False
        kwargs['share_positions'] = shared
    if 'stages.0.0.gamma' not in sd:
        kwargs['layer_scale_init_value'] = 0.
    return kwargs


def check_dilated_kernel_size(trunk: Dict[str, Tensor], dilated_kernel_size: Optional[int]) -> int:
    """The dilated kernel size to record in ``meta``.

    Positions are not stored with their kernel size, so it must be given for
    gaussian/triangle files (the published gaussian model uses 23) and defaults to 17
    (the published bilinear models) otherwise; a size too small for the stored positions
    raises instead of silently clamping them later.

    Args:
        trunk: the backbone state dict.
        dilated_kernel_size: the size given by the user, or ``None``.

    Raises:
        ValueError: ``None`` for a file with ``SIG``, or a size too small for ``P``.
    """
    has_sig = any(k.endswith('.SIG') for k in trunk)
    if dilated_kernel_size is None:
        if has_sig:
            raise ValueError('SRC has SIG entries (gaussian/triangle): pass '
                             '--dilated-kernel-size (23 for the published gaussian ConvNeXt-T)')
        dilated_kernel_size = PUBLISHED_BILINEAR_DILATED_KERNEL_SIZE
    reach = max((float(v.abs().max()) for k, v in trunk.items() if k.endswith('.P')), default=0.)
    if dilated_kernel_size // 2 < reach - 1e-6:
        raise ValueError(f'dilated_kernel_size {dilated_kernel_size} is too small for the '
                         f'stored positions (|P| up to {reach:.2f} needs at least '
                         f'{2 * math.ceil(reach - 1e-6) + 1})')
    return dilated_kernel_size


def convert_convnext_dcls_checkpoint(src: str, dst: str, checkpoint_format: str = 'auto',
                                     dilated_kernel_size: Optional[int] = None,
                                     interpolation: Optional[str] = None) -> dict:
    """Convert the checkpoint ``src`` to a clean dcls-mm backbone checkpoint ``dst``.

    Args:
        src: the source file (read without running code from it).
        dst: the output file (written atomically: complete or absent).
        checkpoint_format: position axis order of ``src`` (see
            :data:`~dcls_mm.models.backbones.convnext_dcls.CHECKPOINT_FORMATS`).
        dilated_kernel_size: see :func:`check_dilated_kernel_size`.
        interpolation: overrides the inferred one (e.g. ``'triangle'``).

    Returns:
        The written checkpoint: ``meta`` (marker, source name and format, the backbone
        config) and ``state_dict``.

    Raises:
        FileNotFoundError, ValueError: a bad input; the message says what.
    """
    checkpoint = load_checkpoint_file(src)
    kwargs = infer_backbone_kwargs(checkpoint)
    if interpolation is not None:
        kwargs['interpolation'] = interpolation
    trunk = _trunk(checkpoint)
    kwargs['dilated_kernel_size'] = check_dilated_kernel_size(trunk, dilated_kernel_size)
    out_norms = sorted({int(m.group(1)) for k in trunk for m in [re.match(r'norm(\d+)\.', k)] if m})
    kwargs['out_indices'] = tuple(out_norms) or (0, 1, 2, 3)
    with torch.device('meta'):  # names and shapes only
        model = ConvNeXtDCLS(**kwargs)
    fmt = resolve_checkpoint_format(checkpoint_format, checkpoint, model_interpolation(model))
    state_dict = checkpoint_filter_fn(checkpoint, model, checkpoint_format=fmt)
    # a classifier's final norm (no axis to convert) under its own name: a backbone
    # with gap_before_final_norm (as norm3) and timm's classifier load it as from SRC,
    # other backbones drop it (the filter dropped it above: this target has no such norm)
    state_dict.update({k: v for k, v in trunk.items() if k.split('.', 1)[0] == 'norm'})
    state_dict = {k: v.contiguous().clone() for k, v in state_dict.items()}
    arch = kwargs.pop('arch')
    kwargs.pop('out_indices')
    out = {
        'meta': {
            DCLS_MM_META_KEY: 1,
            'source': osp.basename(src),
            'source_format': fmt,
            'backbone': dict(type='dcls_mm.ConvNeXtDCLS', arch=arch, **kwargs),
        },
        'state_dict': state_dict,
    }
    with atomic_open(dst, 'wb') as f:
        torch.save(out, f)
    return out
