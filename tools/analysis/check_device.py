"""Check the DCLS layers on a device (a GPU, a new CPU) against float64 on the CPU.

Runs :func:`dcls_mm.ops.selfcheck.check_device`: ``Dcls2d`` of every interpolation,
stride 1 and 2, depthwise fast path (with the measured routes, then each route forced in
turn), plain path and grouped, in float32 and under bfloat16 autocast; output and every
gradient compared with the same layer in float64 on the CPU. Prints one line per failing comparison and a summary, writes every comparison
as JSON with ``--out``, exits 1 when one is out of tolerance.

    python tools/analysis/check_device.py --device cuda --out work_dirs/check_cuda.json
"""
from __future__ import annotations

import argparse
import sys

import torch

from dcls_mm.ops.selfcheck import check_device
from dcls_mm.utils import machine_info, machine_line, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='write every comparison as JSON to this file')
    args = parser.parse_args(argv)
    info = machine_info()
    if args.device.startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name(torch.device(args.device))
    print(f'device={args.device} {info.get("gpu", "")} {machine_line(info)}')
    records = check_device(args.device)
    bad = [r for r in records if not r['ok']]
    for r in bad:
        print(f'FAIL {r["interpolation"]} stride {r["stride"]} {r["path"]} ({r["routes"]} '
              f'routes) {r["dtype"]} {r["tensor"]}: error {r["error"]:.2e} > '
              f'{r["tolerance"]:.0e}')
    worst = {}
    for r in records:
        worst[r['dtype']] = max(worst.get(r['dtype'], 0.0), r['error'])
    print(f'{len(records) - len(bad)}/{len(records)} comparisons within tolerance; largest '
          'relative error ' + ', '.join(f'{k} {v:.1e}' for k, v in worst.items()))
    if args.out:
        write_json(dict(device=args.device, **info, records=records), args.out)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
