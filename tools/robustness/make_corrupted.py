"""Pre-generate corrupted copies of an image folder (ImageNet-C layout), once for many models.

    python tools/robustness/make_corrupted.py SRC OUT
        [--corruptions benchmark|all|extra|noise|blur|weather|digital|NAMES...]
        [--severities 1 2 3 4 5] [--workers N] [--seed S] [--format png|jpeg]
        [--quality Q]

Writes ``OUT/<corruption>/<severity>/<path relative to SRC>`` for every image under
SRC, file names kept (annotations stay valid): ImageNet ``val/`` -> ImageNet-C layout,
COCO ``val2017/`` or ADE20K ``images/validation/`` -> the same tree per set. PNG data
(lossless, default) equals on-the-fly ``dcls_mm.Corrupt`` with the same ``--seed``;
``--format jpeg`` uses quality 85 (ImageNet-C's) unless ``--quality`` says otherwise.
Rerunning the same command resumes (finished files and sets are skipped). Feed the
result to ``tools/robustness/test_downstream.py --corrupted-root OUT``. Library:
:mod:`dcls_mm.evaluation.corrupted_sets`.
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='make_corrupted.py',
        description='Corrupted copies of an image folder: OUT/<corruption>/<severity>/...')
    parser.add_argument('src', help='clean image folder (ImageNet val/, COCO val2017/, '
                        'ADE20K images/validation/)')
    parser.add_argument('out', help='output root; rerunning with the same OUT resumes')
    parser.add_argument('--corruptions', nargs='+', default=['benchmark'],
                        help='corruption names and/or subsets: benchmark (the 15), extra, '
                        'all (19), noise, blur, weather, digital (default: benchmark)')
    parser.add_argument('--severities', nargs='+', type=int, default=[1, 2, 3, 4, 5],
                        help='severities 1..5 (default: all)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                        help='processes (default: all CPU cores)')
    parser.add_argument('--seed', type=int, default=0,
                        help='run seed; same as --seed of test_downstream.py / the seed '
                        'of dcls_mm.Corrupt (default 0)')
    parser.add_argument('--format', choices=('png', 'jpeg'), default='png',
                        help='png: lossless, equals on-the-fly corruption (default); '
                        'jpeg: smaller, lossy')
    parser.add_argument('--quality', type=int, default=85,
                        help='JPEG quality for --format jpeg (default 85, as ImageNet-C)')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dcls_mm.datasets.corruptions import CORRUPTION_SUBSETS
    from dcls_mm.evaluation.corrupted_sets import make_corrupted
    corruptions = []  # subsets expand to their members; make_corrupted checks the names
    for token in args.corruptions:
        corruptions += [c for c in CORRUPTION_SUBSETS.get(token, [token]) if c not in corruptions]
    try:
        return make_corrupted(args.src, args.out, corruptions, args.severities,
                              seed=args.seed, workers=max(1, args.workers), fmt=args.format,
                              quality=args.quality)
    except ValueError as exc:  # includes FingerprintMismatch (another run's OUT)
        sys.exit(f'make_corrupted.py: error: {exc}')


if __name__ == '__main__':
    main()
