#!/usr/bin/env python
"""Convert a ConvNeXt-dcls checkpoint to a clean dcls-mm backbone checkpoint.

Reads a published classification checkpoint (``{'model': ...}``), a published
downstream one (``{'state_dict': {'backbone.*', ...}}``), the reference gaussian
ConvNeXt-T, or a dcls-mm checkpoint, and writes ``{'meta': ..., 'state_dict': ...}``
with the backbone keys of :class:`dcls_mm.models.ConvNeXtDCLS`. The work is
:func:`dcls_mm.models.convert.convert_convnext_dcls_checkpoint`; this script only parses
the command line.

Example::

    .venv/bin/python tools/model_converters/convert_convnext_dcls.py \\
        convnext_dcls_tiny_1k_224_ema.pth convnext_dcls_tiny_backbone.pth

    .venv/bin/python tools/model_converters/convert_convnext_dcls.py --format reference_gauss \\
        --dilated-kernel-size 23 convnext_dcls_gauss_tiny_1k_224_ema.pth gauss_tiny.pth

Load the result with ``init_cfg=dict(type='Pretrained', checkpoint='...pth')``.
"""
from __future__ import annotations

import argparse

from dcls_mm.models import CHECKPOINT_FORMATS, convert_convnext_dcls_checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='source checkpoint')
    parser.add_argument('dst', help='output dcls-mm checkpoint')
    parser.add_argument('--format', default='auto', choices=CHECKPOINT_FORMATS,
                        help="position axis order of SRC ('auto': see "
                             'dcls_mm.models.resolve_checkpoint_format; ambiguous gaussian '
                             'files raise)')
    parser.add_argument('--dilated-kernel-size', type=int, default=None,
                        help='dilated kernel size of SRC (default 17 = published bilinear; '
                             'required with SIG: 23 for the published gaussian model)')
    parser.add_argument('--interpolation', default=None,
                        help="override the inferred interpolation ('gaussian' if SIG, "
                             "else 'bilinear'), e.g. 'triangle'")
    args = parser.parse_args(argv)
    try:
        out = convert_convnext_dcls_checkpoint(args.src, args.dst, args.format,
                                               args.dilated_kernel_size, args.interpolation)
    except (OSError, ValueError) as e:  # bad input: the message says what; no traceback
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    print(f'wrote {args.dst}: {len(out["state_dict"])} tensors, '
          f'backbone={out["meta"]["backbone"]}')


if __name__ == '__main__':
    main()
