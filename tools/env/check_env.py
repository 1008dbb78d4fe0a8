"""Verify that the dcls-mm environment is complete and usable.

Run by ``tools/env/setup.sh`` (with the venv's python). Uses only the standard library
at import time so that it can report, in one line per problem, on an environment where
anything else is broken. Exit status 0 when everything works, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import re
import sys
from pathlib import Path
from typing import Callable

# Distributions whose installed version must equal the pin in requirements/stack.txt.
PINNED_RUNTIME = ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation',
                  'timm', 'pycocotools', 'numpy', 'scipy', 'scikit-image', 'imagecorruptions')


def read_pins(stack: Path) -> dict[str, str]:
    pins = {}
    for line in stack.read_text().splitlines():
        line = line.split('#', 1)[0].strip()  # pip allows comments after a requirement
        m = re.match(r'^([A-Za-z0-9_.\-]+)==(\S+)$', line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _torchvision_op() -> None:
    import torch
    import torchvision
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    if keep.tolist() != [0, 2]:
        raise RuntimeError(f'torchvision.ops.nms returned {keep.tolist()}, expected [0, 2]')


def _mmcv_ops() -> None:
    import torch
    from mmcv.ops import nms, roi_align
    feat = torch.arange(16.).view(1, 1, 4, 4)
    out = roi_align(feat, torch.tensor([[0., 0., 0., 4., 4.]]), (1, 1), 1.0, 1, 'avg', True)
    if abs(out.item() - 7.5) > 1e-5:
        raise RuntimeError(f'mmcv.ops.roi_align returned {out.item()}, expected 7.5')
    nms(torch.tensor([[0., 0., 10., 10.]]), torch.tensor([1.]), 0.5)


def _frost_textures() -> None:
    from dcls_mm.datasets.corruptions import _frost_texture
    for index in range(5):
        _frost_texture(index)


def _import(name: str) -> Callable[[], None]:
    return lambda: importlib.import_module(name)


CHECKS: list[tuple[str, Callable[[], None]]] = [
    ('torch', _import('torch')),
    ('torchvision (compiled ops)', _torchvision_op),
    ('mmengine', _import('mmengine')),
    ('mmcv compiled ops (roi_align, nms)', _mmcv_ops),
    ('mmdet', _import('mmdet')),
    ('mmseg', _import('mmseg')),
    ('timm', _import('timm')),
    ('pycocotools', _import('pycocotools.coco')),
    ('dcls_mm', _import('dcls_mm')),
    ('frost textures of the corruptions (imagecorruptions data files)', _frost_textures),
]


def find_problems(stack: Path) -> list[str]:
    problems = []
    pins = read_pins(stack)
    for dist in PINNED_RUNTIME:
        try:
            have = md.version(dist)
        except md.PackageNotFoundError:
            problems.append(f'{dist} is not installed (pinned {pins.get(dist, "?")})')
            continue
        want = pins.get(dist)
        if want is not None and have.split('+')[0] != want:
            problems.append(f'{dist} {have} is installed, requirements/stack.txt pins {want}')
        if dist == 'torch' and '+cpu' in have:
            problems.append('torch is the local "+cpu" build, with which torchvision cannot '
                            'load its ops; the PyPI build is required')
    for what, check in CHECKS:
        try:
            check()
        except BaseException as exc:  # noqa: BLE001 - report any failure as one line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
            problems.append(f'{what} failed: {type(exc).__name__}: {msg}')
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--stack', type=Path,
                        default=Path(__file__).resolve().parents[2] / 'requirements' / 'stack.txt')
    parser.add_argument('--quiet', action='store_true', help='print only problems')
    args = parser.parse_args(argv)
    problems = find_problems(args.stack)
    for p in problems:
        print(f'  - {p}', file=sys.stderr)
    if not problems and not args.quiet:
        import torch
        print(f'[dcls-mm setup] checked: torch {torch.__version__}, torchvision, mmcv ops, '
              f'mmengine, mmdet, mmseg, timm, pycocotools, dcls_mm', file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
