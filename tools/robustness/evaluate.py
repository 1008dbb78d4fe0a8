"""Robustness of an ImageNet classifier: clean val, ImageNet-C, C-bar, A, R, Sketch.

    python tools/robustness/evaluate.py MODEL [--checkpoint FILE] --benchmark B [B ...]
        --data-root ROOT [--data B=PATH ...] [--out-dir DIR] [--batch-size N]
        [--workers N] [--device cpu|cuda] [--amp] [--limit-per-set N]
    torchrun --nproc_per_node K tools/robustness/evaluate.py ...   # same numbers, K shards

Benchmarks: imagenet (ROOT/imagenet/val/<wnid>/), imagenet-c
(ROOT/imagenet-c/<corruption>/<1..5>/<wnid>/), imagenet-c-bar, imagenet-a, imagenet-r,
imagenet-sketch (ROOT/imagenet-sketch or ROOT/sketch), or all. Writes OUT/results.json,
OUT/results.csv and severity plots; finished sets are kept in OUT/records.jsonl, so
rerunning the same command resumes. Library: :mod:`dcls_mm.evaluation.classification`.
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import ast
import os
import os.path as osp
import sys
from typing import Dict, List, Optional

from dcls_mm.evaluation.classification import EvalConfig, run_evaluation
from dcls_mm.evaluation.compare import compare_results
from dcls_mm.evaluation.folders import BENCHMARKS


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _pairs(values: Optional[List[str]], what: str, literal: bool) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for item in values or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise SystemExit(f'evaluate.py: error: {what} expects KEY=VALUE, got {item!r}')
        if literal:
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value  # a bare word such as arch=atto
        else:
            out[key] = value
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='evaluate.py', description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='timm model name (convnext_dcls_tiny, convnext_tiny, ...)')
    parser.add_argument('--checkpoint', help='weights file (published ConvNeXt-dcls files, '
                        'timm state dicts, dcls-mm files); default: random weights')
    parser.add_argument('--benchmark', nargs='+', required=True,
                        choices=list(BENCHMARKS) + ['all'], metavar='B',
                        help=f'{", ".join(BENCHMARKS)}, or all (those whose folder exists)')
    parser.add_argument('--data-root', help='folder holding imagenet/val, imagenet-c, '
                        'imagenet-c-bar, imagenet-a, imagenet-r, imagenet-sketch (or sketch)')
    parser.add_argument('--data', nargs='+', metavar='B=PATH', action='extend',
                        help='folder of one benchmark, overriding --data-root')
    parser.add_argument('--out-dir', help='results folder (default: '
                        'work_dirs/robustness/<model>); rerunning with it resumes')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=None,
                        help='image decoding processes (default: min(4, CPUs - 1))')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--amp', action='store_true',
                        help='autocast: float16 on CUDA, bfloat16 on CPU')
    parser.add_argument('--no-channels-last', action='store_true',
                        help='keep NCHW (default: channels_last model and inputs)')
    parser.add_argument('--limit-per-set', type=_at_least_one,
                        help='at most N images per set, evenly spaced (quick looks)')
    parser.add_argument('--clean-top1', type=float,
                        help='clean top-1 (%%) for the relative mCE when imagenet is not '
                        'evaluated in this output folder')
    parser.add_argument('--on-bad-image', choices=['skip', 'fail'], default='skip',
                        help='unreadable image: skip it with a warning and count it in '
                        '"unreadable" (default), or stop')
    parser.add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE', action='extend',
                        help='extra timm.create_model arguments, e.g. arch=atto')
    parser.add_argument('--no-progress', action='store_true', help='no bars, no ETA lines')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    workers = args.workers if args.workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    cfg = EvalConfig(
        model=args.model, benchmarks=args.benchmark, data_root=args.data_root,
        data=_pairs(args.data, '--data', literal=False),
        out_dir=args.out_dir or osp.join('work_dirs', 'robustness', args.model),
        checkpoint=args.checkpoint,
        model_kwargs=_pairs(args.model_kwargs, '--model-kwargs', literal=True),
        batch_size=args.batch_size, workers=workers, device=args.device, amp=args.amp,
        channels_last=not args.no_channels_last, limit_per_set=args.limit_per_set,
        clean_top1=args.clean_top1, on_bad_image=args.on_bad_image,
        progress=not args.no_progress)
    try:
        out = run_evaluation(cfg)
    except ValueError as e:  # layout, checkpoint, fingerprint, bad image: one line
        print(f'evaluate.py: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    if out['results'] is not None:
        print(compare_results([osp.join(cfg.out_dir, 'results.json')])['table'])
        print('wrote ' + ', '.join(out['files']))
    return out


if __name__ == '__main__':
    main()
