"""Average speed of the learned positions over training, next to the learning rate
(DCLS paper, Appendix 11).

    python tools/analysis/position_dynamics.py WORK_DIR [--out-dir DIR]
    python tools/analysis/position_dynamics.py --checkpoints A.pth B.pth C.pth [--out-dir DIR]

WORK_DIR is an mmengine run's work dir (its ``epoch_N.pth`` / ``iter_N.pth`` and the
learning rate logged in ``*/vis_data/scalars.json``). Writes ``position_speeds.csv``
(one row per checkpoint interval and stage), ``learning_rate.csv`` and
``position_speeds.png``.
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse

from dcls_mm.analysis.dynamics import run_position_dynamics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('work_dir', nargs='?', default=None, help='mmengine work dir')
    parser.add_argument('--checkpoints', nargs='+', default=None,
                        help='checkpoints in training order (instead of those of WORK_DIR)')
    parser.add_argument('--out-dir', default=None,
                        help='output folder (default: WORK_DIR/position_dynamics, '
                        'or work_dirs/analysis/position_dynamics)')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.work_dir is None and args.checkpoints is None:
        raise SystemExit('error: give WORK_DIR or --checkpoints')
    out_dir = args.out_dir or (f'{args.work_dir}/position_dynamics' if args.work_dir
                               else 'work_dirs/analysis/position_dynamics')
    try:
        result = run_position_dynamics(out_dir, args.work_dir, args.checkpoints)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    for row in result['rows']:
        lr = '' if row['lr'] is None else f', lr {row["lr"]:.3g}'
        print(f'{row["from"]} -> {row["to"]} {row["group"]}: {row["speed"]:.4g} cells/'
              f'{row["unit"]}{lr}')
    print('wrote ' + ', '.join(result['files']))
    return result


if __name__ == '__main__':
    main()
