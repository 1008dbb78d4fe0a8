"""Robustness of an mmdet detector or mmseg segmentor to image corruptions.

    python tools/robustness/test_downstream.py CONFIG CHECKPOINT
        [--corruptions benchmark|all|extra|noise|blur|weather|digital|NAMES...]
        [--severities 0 1 2 3 4 5] [--out-dir DIR] [--corrupted-root DIR] [--seed N]
        [--work-dir DIR] [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

Evaluates the clean test set (severity 0) and every corruption x severity with the
config's own test metric and writes ``OUT/results.json`` (P, mPC, rPC per metric, the
per-set table, which sets the numbers cover), ``OUT/results.csv`` and
``OUT/plots/<metric>.png``. Finished sets are recorded in ``OUT/records.jsonl``: a rerun
resumes. Several processes (CPU or GPU):
``python -m torch.distributed.run --nproc_per_node N tools/robustness/test_downstream.py
CONFIG CHECKPOINT --launcher pytorch ...``. Library: :mod:`dcls_mm.evaluation.downstream`.
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import os.path as osp
import sys

from mmengine.config import Config

from dcls_mm.engine.runner_utils import add_common_args, apply_common_args, parse_tool_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='test_downstream.py',
        description='Clean and corrupted test sets: P, mPC, rPC of a detector/segmentor')
    parser.add_argument('config', help='mmdet or mmseg config file')
    parser.add_argument('checkpoint', help='checkpoint file (must fit the model)')
    parser.add_argument('--corruptions', nargs='+', default=['benchmark'],
                        help='corruption names and/or subsets: benchmark (the 15), extra, '
                        'all (19), noise, blur, weather, digital (default: benchmark)')
    parser.add_argument('--severities', nargs='+', type=int, default=[0, 1, 2, 3, 4, 5],
                        help='0 = clean set, 1..5 = corruption strength (default: 0..5)')
    parser.add_argument('--out-dir', help='results folder (default: '
                        'work_dirs/robustness/<config name>); a rerun with the same '
                        'folder resumes')
    parser.add_argument('--corrupted-root', help='pre-generated images: the OUT folder of '
                        "tools/robustness/make_corrupted.py run on the config's test image "
                        'folder (read from DIR/<corruption>/<severity>/)')
    parser.add_argument('--seed', type=int, default=0,
                        help='base seed of the on-the-fly corruption (default 0)')
    parser.add_argument('--label', help='model name in the plots (default: config name)')
    add_common_args(parser)
    return parse_tool_args(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dcls_mm.evaluation.downstream import evaluate_downstream
    from dcls_mm.evaluation.records import FingerprintMismatch

    name = osp.splitext(osp.basename(args.config))[0]
    out_dir = args.out_dir or osp.join('work_dirs', 'robustness', name)
    try:
        cfg = Config.fromfile(args.config)
        if args.work_dir is None:
            cfg.work_dir = osp.join(out_dir, 'runner')
        apply_common_args(cfg, args)
        results = evaluate_downstream(
            cfg, args.checkpoint, out_dir, args.corruptions, args.severities,
            corrupted_root=args.corrupted_root, seed=args.seed, label=args.label)
    except (ValueError, FileNotFoundError, FingerprintMismatch) as e:
        sys.exit(f'test_downstream.py: error: {e}')
    if 'metrics' in results:
        print(f'\n{"metric":<24}{"P":>10}{"mPC":>10}{"rPC":>8}')
        for metric, row in results['metrics'].items():
            cells = [f'{row[k]:>10.4g}' if row[k] is not None else f'{"-":>10}'
                     for k in ('P', 'mPC')]
            rpc = f'{row["rPC"]:>8.3f}' if row['rPC'] is not None else f'{"-":>8}'
            print(f'{metric:<24}{"".join(cells)}{rpc}')
        print(f'results: {osp.join(out_dir, "results.json")} (+ results.csv, plots/); '
              f'evaluated now: {len(results["evaluated"])} set(s)')
    return results


if __name__ == '__main__':
    main()
