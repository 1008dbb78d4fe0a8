#!/usr/bin/env python
"""Convert a ConvNeXt-dcls checkpoint to a clean dcls-mm backbone checkpoint.

Reads a published classification checkpoint (``{'model': ...}``), a published
downstream one (``{'state_dict': {'backbone.*', ...}}``), the reference gaussian
ConvNeXt-T, or a dcls-mm checkpoint, and writes ``{'meta': ..., 'state_dict': ...}``
with the backbone keys of :class:`dcls_mm.models.ConvNeXtDCLS` (positions in dcls-mm
axis order; ``norm{i}`` only if the source has them). The architecture is inferred from
the weights; the remapping is :func:`dcls_mm.models.checkpoint_filter_fn`.

Example::

    python tools/model_converters/convert_convnext_dcls.py \\
        convnext_dcls_tiny_1k_224_ema.pth convnext_dcls_tiny_backbone.pth

    python tools/model_converters/convert_convnext_dcls.py --format reference_gauss \\
        --dilated-kernel-size 23 convnext_dcls_gauss_tiny_1k_224_ema.pth gauss_tiny.pth

Load the result with ``init_cfg=dict(type='Pretrained', checkpoint='...pth')``.
"""
from __future__ import annotations

import argparse
import math
import os.path as osp
import re
import sys
from typing import Optional

import torch

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..', '..')))

from dcls_mm.models import ConvNeXtDCLS, checkpoint_filter_fn  # noqa: E402
from dcls_mm.models.checkpoint import (CHECKPOINT_FORMATS, DCLS_MM_META_KEY,  # noqa: E402
                                       _select_prefix, infer_backbone_kwargs, load_checkpoint_file,
                                       resolve_checkpoint_format, unwrap_checkpoint)


def check_dilated_kernel_size(trunk: dict, dilated_kernel_size: Optional[int]) -> int:
    """The size to record in ``meta``: positions are not stored with their kernel size,
    so it must be given for gaussian/triangle files (the published gaussian model uses 23)
    and defaults to 17 (the published bilinear models) otherwise; a size too small for
    the stored positions raises instead of silently clamping them later."""
    has_sig = any(k.endswith('.SIG') for k in trunk)
    if dilated_kernel_size is None:
        if has_sig:
            raise ValueError('SRC has SIG entries (gaussian/triangle): pass '
                             '--dilated-kernel-size (23 for the published gaussian ConvNeXt-T)')
        dilated_kernel_size = 17
    reach = max((float(v.abs().max()) for k, v in trunk.items() if k.endswith('.P')), default=0.)
    if dilated_kernel_size // 2 < reach - 1e-6:
        raise ValueError(f'dilated_kernel_size {dilated_kernel_size} is too small for the '
                         f'stored positions (|P| up to {reach:.2f} needs at least '
                         f'{2 * math.ceil(reach - 1e-6) + 1})')
    return dilated_kernel_size


def convert(src: str, dst: str, checkpoint_format: str = 'auto',
            dilated_kernel_size: Optional[int] = None, interpolation: str = None) -> dict:
    """Convert ``src`` to ``dst``; returns the written checkpoint."""
    checkpoint = load_checkpoint_file(src)
    kwargs = infer_backbone_kwargs(checkpoint)
    if interpolation is not None:
        kwargs['interpolation'] = interpolation
    flat, _ = unwrap_checkpoint(checkpoint)
    trunk = _select_prefix(flat, None)
    kwargs['dilated_kernel_size'] = check_dilated_kernel_size(trunk, dilated_kernel_size)
    out_norms = sorted({int(m.group(1)) for k in trunk for m in [re.match(r'norm(\d+)\.', k)] if m})
    kwargs['out_indices'] = tuple(out_norms) or (0, 1, 2, 3)
    with torch.device('meta'):  # names and shapes only
        model = ConvNeXtDCLS(**kwargs)
    fmt = resolve_checkpoint_format(checkpoint_format, checkpoint)
    state_dict = checkpoint_filter_fn(checkpoint, model, checkpoint_format=fmt)
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
    torch.save(out, dst)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='source checkpoint')
    parser.add_argument('dst', help='output dcls-mm checkpoint')
    parser.add_argument('--format', default='auto', choices=CHECKPOINT_FORMATS,
                        help="position axis order of SRC ('auto': see "
                             "dcls_mm.models.checkpoint; ambiguous gaussian files raise)")
    parser.add_argument('--dilated-kernel-size', type=int, default=None,
                        help='dilated kernel size of SRC (default 17 = published bilinear; '
                             'required with SIG: 23 for the published gaussian model)')
    parser.add_argument('--interpolation', default=None,
                        help="override the inferred interpolation ('gaussian' if SIG, "
                             "else 'bilinear'), e.g. 'triangle'")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.format, args.dilated_kernel_size,
                      args.interpolation)
    except (OSError, ValueError) as e:  # bad input: the message says what; no traceback
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    print(f'wrote {args.dst}: {len(out["state_dict"])} tensors, '
          f'backbone={out["meta"]["backbone"]}')


if __name__ == '__main__':
    main()
