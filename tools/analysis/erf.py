"""Effective receptive fields of one or more models, side by side (DCLS paper, Appendix 12).

    python tools/analysis/erf.py --model SPEC [--model SPEC ...] [--images DIR]
        [--num-images 50] [--size 1024] [--stage -1 | --layer NAME] [--out-dir DIR]

SPEC is ``SOURCE[@CHECKPOINT]`` (see :mod:`dcls_mm.analysis.loading`): a config
``.py`` (its backbone), ``timm:NAME`` or ``convnext_dcls:KEY=VALUE,...``. Without
``--images`` the images are generated (noise; said on the plot). Writes ``erf.png``,
``erf_<label>.npy`` and ``erf.json`` (RepLKNet's high-contribution area ratios at
thresholds 0.2/0.3/0.5/0.99).
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import json
import sys

from dcls_mm.analysis.erf import run_erf
from dcls_mm.analysis.loading import build_labelled_models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', action='append', required=True, metavar='SPEC',
                        help='SOURCE[@CHECKPOINT]: config .py | timm:NAME | '
                        'convnext_dcls:KEY=VALUE,... (repeat for side-by-side panels)')
    parser.add_argument('--label', action='append', default=None,
                        help='panel label per --model (default: derived from the spec)')
    parser.add_argument('--images', default=None,
                        help='image folder (recursive); default: generated images')
    parser.add_argument('--num-images', type=int, default=50, help='images (RepLKNet: 50)')
    parser.add_argument('--size', type=int, default=1024, help='input side (RepLKNet: 1024)')
    parser.add_argument('--stage', type=int, default=-1,
                        help='stage whose output is analysed (module stages.<i>)')
    parser.add_argument('--layer', default=None,
                        help='module name to analyse instead of a stage (e.g. layer4)')
    parser.add_argument('--seed', type=int, default=0, help='seed of generated images')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    parser.add_argument('--out-dir', default='work_dirs/analysis/erf', help='output folder')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        models = build_labelled_models(args.model, args.label, args.threads)
        result = run_erf(models, args.out_dir, args.images, args.num_images, args.size,
                         args.layer, args.stage, args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    json.dump(result, sys.stdout, indent=1)
    print(f'\nwrote {args.out_dir}/erf.png, erf.json and the .npy arrays')
    return result


if __name__ == '__main__':
    main()
