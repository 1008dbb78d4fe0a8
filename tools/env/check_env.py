"""Verify that the dcls-mm environment is complete and usable.

Run by ``tools/env/setup.sh`` (with the venv's python). Uses only the standard library
at import time so that it can report, in one line per problem, on an environment where
anything else is broken. Exit status 0 when everything works, 1 otherwise.

The compiled ops of torchvision and mmcv are run and compared with plain-Python
references written here (greedy NMS, RoIAlign from its definition): a torchvision built
for another torch, or an mmcv built without ``MMCV_WITH_OPS``, imports fine and fails
or misbehaves only when an op is called. These are checks of the installation, kept
here rather than in the test suite, which runs one of them (``tests/test_environment.py``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

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


# --------------------------------------------------------------------------------------
# Plain-Python references of the compiled ops (lists in, lists out)
# --------------------------------------------------------------------------------------
Box = Sequence[float]


def iou(a: Box, b: Box) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes, areas without the legacy +1 (offset 0)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_nms(boxes: Sequence[Box], scores: Sequence[float], thr: float) -> list[int]:
    """Plain greedy NMS: keep boxes by decreasing score, dropping a box whose IoU with a
    kept box is above ``thr``.

    Returns:
        Indices of the kept boxes, highest score first.
    """
    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(iou(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def _neighbours(v: float, n: int) -> tuple[float, int, int]:
    """A coordinate in ``[0, n)`` and its two grid neighbours, clamped to the last index."""
    v = max(v, 0.0)
    if int(v) >= n - 1:
        return float(n - 1), n - 1, n - 1
    return v, int(v), int(v) + 1


def bilinear(feat: Sequence[Sequence[float]], y: float, x: float) -> float:
    """Bilinear sample of an ``(H, W)`` map as RoIAlign takes it: zero outside
    ``[-1, H] x [-1, W]``, coordinates clamped to the border inside that band."""
    h, w = len(feat), len(feat[0])
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, y0, y1 = _neighbours(y, h)
    x, x0, x1 = _neighbours(x, w)
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feat[y0][x0] + hy * lx * feat[y0][x1] + ly * hx * feat[y1][x0] +
            ly * lx * feat[y1][x1])


def roi_align_reference(feat: Sequence, rois: Sequence[Sequence[float]],
                        out_hw: tuple[int, int], scale: float,
                        sampling_ratio: int) -> list:
    """RoIAlign (average pooling, ``aligned=True``) written from its definition: each
    output bin averages ``sampling_ratio ** 2`` bilinear samples at the centres of a
    regular grid inside the bin; box corners are shifted by half a pixel.

    Args:
        feat: ``(N, C, H, W)`` nested lists.
        rois: ``(batch index, x1, y1, x2, y2)`` rows, in image coordinates.
        out_hw: output bins ``(h, w)``.
        scale: image -> feature map scale.
        sampling_ratio: samples per bin side (> 0).

    Returns:
        ``(len(rois), C, h, w)`` nested lists.
    """
    if sampling_ratio <= 0:
        raise ValueError('sampling_ratio must be positive')
    ph_n, pw_n = out_hw
    out = []
    for b, x1, y1, x2, y2 in rois:
        sx, sy = x1 * scale - 0.5, y1 * scale - 0.5
        bw, bh = (x2 - x1) * scale / pw_n, (y2 - y1) * scale / ph_n
        per_channel = []
        for fmap in feat[int(b)]:
            bins = [[0.0] * pw_n for _ in range(ph_n)]
            for ph in range(ph_n):
                for pw in range(pw_n):
                    acc = 0.0
                    for iy in range(sampling_ratio):
                        y = sy + ph * bh + (iy + 0.5) * bh / sampling_ratio
                        for ix in range(sampling_ratio):
                            x = sx + pw * bw + (ix + 0.5) * bw / sampling_ratio
                            acc += bilinear(fmap, y, x)
                    bins[ph][pw] = acc / sampling_ratio**2
            per_channel.append(bins)
        out.append(per_channel)
    return out


def _nms_case(seed: int, n: int = 40):
    """``n`` boxes in four overlapping clusters (so that NMS suppresses) and distinct
    scores, as float32 tensors."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    centres = 20 + 60 * torch.rand(4, 2, generator=gen)
    c = centres[torch.randint(0, 4, (n, ), generator=gen)] + 4 * torch.randn(n, 2, generator=gen)
    wh = 8 + 22 * torch.rand(n, 2, generator=gen)
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1).float()
    scores = torch.linspace(0.05, 0.95, n)[torch.randperm(n, generator=gen)]
    return boxes, scores


def _roi_case():
    """Feature map ``(2, 3, 7, 9)`` and boxes: inside, partly outside, on the other image,
    sub-pixel."""
    import torch
    feat = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    rois = torch.tensor([[0, 1.3, 0.7, 6.1, 5.2], [0, -2.3, -1.6, 4.4, 3.9],
                         [1, 3.2, 2.1, 10.7, 8.3], [1, 2.2, 3.1, 2.9, 3.4]])
    return feat, rois


def _expect(what: str, got, want) -> None:
    if got != want:
        raise RuntimeError(f'{what} gave {got}, the reference {want}')


def _expect_close(what: str, got, want: Sequence, tol: float = 1e-5) -> None:
    import torch
    want = torch.tensor(want, dtype=torch.float64)
    if got.shape != want.shape or not torch.allclose(got.double(), want, rtol=tol, atol=tol):
        diff = ((got.double() - want).abs().max().item() if got.shape == want.shape
                else f'shape {tuple(got.shape)} != {tuple(want.shape)}')
        raise RuntimeError(f'{what} differs from the reference (max abs diff {diff})')


# --------------------------------------------------------------------------------------
# Checks of the compiled ops
# --------------------------------------------------------------------------------------
def _torchvision_op() -> None:
    import torchvision
    boxes, scores = _nms_case(seed=0)
    want = {thr: greedy_nms(boxes.tolist(), scores.tolist(), thr) for thr in (0.3, 0.5, 0.7)}
    if not 0 < len(want[0.3]) < len(boxes):
        raise RuntimeError('the NMS case does not suppress: it checks nothing')
    for thr, keep in want.items():
        _expect(f'torchvision.ops.nms at IoU {thr}',
                torchvision.ops.nms(boxes, scores, thr).tolist(), keep)


def _mmcv_ops() -> None:
    import torch
    from mmcv.ops import RoIAlign, get_compiler_version, nms, roi_align
    if not get_compiler_version():  # empty when mmcv._ext is missing
        raise RuntimeError('mmcv was built without its ops (MMCV_WITH_OPS)')
    boxes, scores = _nms_case(seed=2)
    for thr in (0.3, 0.5, 0.7):
        keep = greedy_nms(boxes.tolist(), scores.tolist(), thr)
        dets, inds = nms(boxes, scores, thr)
        _expect(f'mmcv.ops.nms at IoU {thr}', inds.tolist(), keep)
        _expect_close(f'mmcv.ops.nms boxes at IoU {thr}', dets[:, :4], boxes[keep].tolist())
        _expect_close(f'mmcv.ops.nms scores at IoU {thr}', dets[:, 4], scores[keep].tolist())

    # a 2x2 box on a ramp (value = 4 y + x), one bin, one sample: the value at its centre
    ramp = torch.arange(16.).view(1, 1, 4, 4)
    out = roi_align(ramp, torch.tensor([[0., 1., 1., 3., 3.]]), (1, 1), 1.0, 1, 'avg', True)
    _expect_close('mmcv.ops.roi_align on a ramp', out.view(1), [4 * 1.5 + 1.5])
    feat, rois = _roi_case()
    out = roi_align(feat, rois, (3, 3), spatial_scale=1.0, sampling_ratio=2, pool_mode='avg',
                    aligned=True)
    _expect_close('mmcv.ops.roi_align', out,
                  roi_align_reference(feat.tolist(), rois.tolist(), (3, 3), 1.0, 2))

    # the module at scale 0.5 (image coordinates twice the feature map's), and backward
    layer = RoIAlign((2, 4), spatial_scale=0.5, sampling_ratio=2, pool_mode='avg',
                     aligned=True)
    rois = rois * torch.tensor([1., 2., 2., 2., 2.])
    feat.requires_grad_(True)
    _expect_close('mmcv.ops.RoIAlign', layer(feat, rois).detach(),
                  roi_align_reference(feat.tolist(), rois.tolist(), (2, 4), 0.5, 2))
    # for a box well inside the map the bilinear weights of each sample sum to one, so
    # the gradient of the sum of its outputs sums to the number of outputs
    layer(feat, torch.tensor([[0., 2.6, 2.2, 12.2, 10.4]])).sum().backward()
    _expect_close('mmcv.ops.RoIAlign backward (gradient sum per image)',
                  torch.stack([feat.grad[0].sum(), feat.grad[1].abs().sum()]), [2 * 4 * 3, 0.0])


def _timm_layer() -> None:
    import torch
    from timm.layers import DropPath
    _expect('timm DropPath in eval mode', DropPath(0.1).eval()(torch.ones(2, 3)).tolist(),
            [[1.0] * 3] * 2)


def _frost_textures() -> None:
    from dcls_mm.datasets.corruptions import _frost_texture
    for index in range(5):
        _frost_texture(index)


def _import(name: str) -> Callable[[], None]:
    return lambda: importlib.import_module(name)


CHECKS: list[tuple[str, Callable[[], None]]] = [
    ('torch', _import('torch')),
    ('torchvision compiled ops (nms)', _torchvision_op),
    ('mmengine', _import('mmengine')),
    ('mmcv compiled ops (nms, roi_align, RoIAlign and its backward)', _mmcv_ops),
    ('mmdet', _import('mmdet')),
    ('mmseg', _import('mmseg')),
    ('timm', _timm_layer),
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
