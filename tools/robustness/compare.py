"""Compare robustness results side by side (Table-5 style) and draw the severity curves.

    python tools/robustness/compare.py A/results.json B/results.json [...] [--out-dir D]

Accepts the classifier results of ``tools/robustness/evaluate.py`` (clean top-1, mCE,
relative mCE, C-bar error, A/R/Sketch top-1, CE per corruption) and the downstream
results of ``tools/robustness/test_downstream.py`` (P, mPC, rPC per metric); all files
must be of one kind. Rows ``delta X`` give each further file minus the first. With
``--out-dir``: ``compare.csv`` and one PNG per figure (error or metric vs severity, one
line per model). Library: :mod:`dcls_mm.evaluation.compare`.
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import sys

from dcls_mm.evaluation.compare import compare_results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='compare.py', description=__doc__.split('\n')[0])
    parser.add_argument('results', nargs='+', help='results.json files (first = baseline)')
    parser.add_argument('--out-dir', help='write compare.csv and the plots here')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        out = compare_results(args.results, args.out_dir)
    except ValueError as e:
        print(f'compare.py: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    print(out['table'])
    if out['files']:
        print('wrote ' + ', '.join(out['files']))
    return out


if __name__ == '__main__':
    main()
