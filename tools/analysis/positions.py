"""Learned positions and kernels of a DCLS model, per stage (DCLS paper, Appendix 10).

    python tools/analysis/positions.py --model SPEC [--channels 0 1 2 3] [--out-dir DIR]

SPEC is ``SOURCE[@CHECKPOINT]`` (see :mod:`dcls_mm.analysis.loading`), e.g.
``convnext_dcls:arch=tiny@checkpoints/convnext_dcls_tiny_1k_224_ema.pth`` or
``configs/demo/upernet_convnext-dcls-atto_demo-ade20k-64x64.py@work_dirs/demo_seg/iter_4.pth``
(the dilated kernel size and interpolation come from the model, not the checkpoint).
Writes ``positions.json`` (cell counts, distances to the centre, elements at the clamp
limit, overlaps, learned widths), ``positions.png`` and ``kernels.png``.
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse

from dcls_mm.analysis.loading import build_analysis_model, default_label
from dcls_mm.analysis.positions import run_positions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, metavar='SPEC',
                        help='SOURCE[@CHECKPOINT]: config .py | timm:NAME | '
                        'convnext_dcls:KEY=VALUE,...')
    parser.add_argument('--channels', type=int, nargs='+', default=[0, 1, 2, 3],
                        help='output channels whose constructed kernels are drawn')
    parser.add_argument('--out-dir', default='work_dirs/analysis/positions', help='output folder')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        model = build_analysis_model(args.model)
        result = run_positions(model, args.out_dir, args.channels, default_label(args.model))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    for name, s in result['groups'].items():
        print(f'{name}: {s["num_elements"]} elements, mean distance {s["distance"]["mean"]:.2f}, '
              f'at limit {s["at_limit"]} ({100 * s["at_limit_fraction"]:.1f}%), overlapping '
              f'{s["overlapping"]} ({100 * s["overlapping_fraction"]:.1f}%)')
    print(f'wrote {args.out_dir}/positions.json, positions.png, kernels.png')
    return result


if __name__ == '__main__':
    main()
