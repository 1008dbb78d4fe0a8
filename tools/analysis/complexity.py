"""Parameters, FLOPs, activations and throughput of models, as a Markdown table like
the DCLS paper's Table 2.

    python tools/analysis/complexity.py --model SPEC [--model SPEC ...] [--shape 224 224]
        [--batch-size 8] [--device cpu] [--no-throughput] [--out table.md]

SPEC is ``SOURCE[@CHECKPOINT]`` (see :mod:`dcls_mm.analysis.loading`); for a config
the backbone is measured. FLOPs (multiply-accumulates, mmengine's ``FlopAnalyzer``)
count a DCLS layer as the dense convolution with its dilated kernel plus the kernel's
construction. Throughput is measured in this run; the last column is its ratio to the
first model's, and the CPU capability is printed with it. A model without a checkpoint
runs with its initial positions, near the kernel's centre, where the CPU depthwise path
convolves with only the taps they reach: give a checkpoint for a trained model's speed.
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import json
import os
import os.path as osp

import torch

from dcls_mm.analysis.complexity import complexity_table, run_complexity
from dcls_mm.analysis.loading import build_labelled_models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', action='append', required=True, metavar='SPEC',
                        help='SOURCE[@CHECKPOINT]: config .py | timm:NAME | '
                        'convnext_dcls:KEY=VALUE,...')
    parser.add_argument('--label', action='append', default=None, help='row label per --model')
    parser.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'),
                        help='input size')
    parser.add_argument('--batch-size', type=int, default=8, help='throughput batch size')
    parser.add_argument('--repeats', type=int, default=5, help='timed throughput batches')
    parser.add_argument('--device', default='cpu', help='throughput device (cpu, cuda)')
    parser.add_argument('--no-throughput', action='store_true', help='skip the timing')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    parser.add_argument('--out', default=None, help='also write the table to this .md file '
                        '(and the rows to the same name with .json)')
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.out:  # before the measurements, which a missing folder would waste
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    try:
        models = build_labelled_models(args.model, args.label, args.threads)
        rows = run_complexity(models, (3, *args.shape), not args.no_throughput,
                              args.batch_size, args.device, args.repeats)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    table = complexity_table(rows)
    if not args.no_throughput:
        where = (torch.cuda.get_device_name(args.device) if args.device.startswith('cuda')
                 else f'CPU capability {torch.backends.cpu.get_cpu_capability()}, '
                 f'{torch.get_num_threads()} threads')
        table += (f'\nThroughput: batch {args.batch_size}, {where}, median of '
                  f'{args.repeats} batches; ratios measured in the same run.\n')
    print(table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table)
        with open(osp.splitext(args.out)[0] + '.json', 'w') as f:
            json.dump(rows, f, indent=1)
    return table


if __name__ == '__main__':
    main()
