"""Run imagecorruptions 1.1.2 (the reference) beside dcls_mm's corruptions, in a side env.

Not for dcls-mm's own environment (the reference fails on NumPy 2): run by
``benchmark_corruptions.py --reference-python PY`` with the Python of a side
environment made as that script's docstring says. Two jobs, one JSON line on stdout:

* ``serve``: ms/image of ``imagecorruptions.corrupt`` (all severities) on the images of
  an ``.npy`` file, for each corruption name read from stdin (one JSON number a line);
* ``compare``: outputs of dcls_mm (computed in dcls-mm's own environment, saved as
  ``.npy``) against the reference on the same images, with the reference's
  ``np.random.*`` calls replayed from an ``np.random.Generator`` seeded as dcls_mm's was,
  so random corruptions are compared too: max |difference| and fraction of differing
  values per corruption.

The only patch applied to the reference: ``skimage.filters.gaussian(multichannel=True)``
(removed in scikit-image 0.20) is forwarded as ``channel_axis=-1``; the numbers are the
same, the keyword is the only change.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings

import numpy
import numpy as np
import skimage
from PIL import Image

warnings.filterwarnings('ignore')
import imagecorruptions  # noqa: E402
import imagecorruptions.corruptions as ref  # noqa: E402

_gaussian = ref.gaussian


def _gaussian_compat(*args, multichannel=None, **kwargs):
    if multichannel:
        kwargs['channel_axis'] = -1
    return _gaussian(*args, **kwargs)


ref.gaussian = _gaussian_compat


class _Replay:
    """``np.random`` stand-in for the reference that draws from a Generator in the order
    and shapes dcls_mm draws (glass blur: one (visits, 2) block per pass)."""

    def __init__(self, rng: np.random.Generator, visits: int):
        self.rng, self.visits, self.block = rng, visits, []

    def normal(self, loc=0.0, scale=1.0, size=None):
        return self.rng.normal(loc, scale, size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self.rng.uniform(low, high, size)

    def poisson(self, lam=1.0, size=None):
        return self.rng.poisson(lam, size)

    def randint(self, low, high=None, size=None):
        if size == (2,):  # glass blur's per-pixel draw
            if not self.block:
                self.block = list(self.rng.integers(low, high, size=(self.visits, 2)))
            return self.block.pop(0)
        return self.rng.integers(low, high, size)


class _Module(types.ModuleType):
    def __init__(self, base, **overrides):
        super().__init__(base.__name__)
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._base, name)


def time_reference(images: np.ndarray, name: str, repeats: int) -> float:
    """ms per image of ``imagecorruptions.corrupt``: for each severity the fastest call
    over images x repeats (the least disturbed by other load), averaged over severities;
    after a warm-up call. The benchmark times dcls_mm the same way."""
    imagecorruptions.corrupt(images[0], 1, name)
    best = []
    for severity in range(1, 6):
        calls = []
        for _ in range(repeats):
            for img in images:
                t0 = time.perf_counter()
                imagecorruptions.corrupt(img, severity, name)
                calls.append(time.perf_counter() - t0)
        best.append(min(calls))
    return 1000 * sum(best) / len(best)


def serve(images: np.ndarray, repeats: int) -> None:
    """Time one corruption per request: a name on each stdin line, its ms on stdout (so
    the benchmark can interleave the reference with dcls_mm corruption by corruption)."""
    for line in sys.stdin:
        print(json.dumps(time_reference(images, line.strip(), repeats)), flush=True)


def compare(images: np.ndarray, names, outputs_dir: str) -> dict:
    glass_delta = [1, 2, 2, 3, 4]
    out = {}
    for name in names:
        ours = np.load(f'{outputs_dir}/{name}.npy')  # (images, 5 severities, H, W, 3)
        worst, differing, total = 0, 0, 0
        for i, img in enumerate(images):
            for s in range(5):
                h, w = img.shape[:2]
                visits = (h - 2 * glass_delta[s]) * (w - 2 * glass_delta[s])
                rng = np.random.default_rng(compare_seed(i, s))
                ref.np = _Module(numpy, random=_Replay(rng, visits))
                ref.sk = _Module(skimage, util=types.SimpleNamespace(
                    random_noise=lambda *a, _g=rng, **k: skimage.util.random_noise(
                        *a, rng=_g, **k)))
                try:
                    expected = np.uint8(getattr(ref, name)(Image.fromarray(img), s + 1))
                finally:
                    ref.np, ref.sk = numpy, skimage
                diff = np.abs(expected.astype(np.int16) - ours[i, s].astype(np.int16))
                worst = max(worst, int(diff.max()))
                differing += int((diff > 0).sum())
                total += diff.size
        out[name] = dict(max_abs_diff=worst, fraction_differing=differing / total)
        print(f'  compare {name:18s} max|diff| {worst:3d}  differing {differing / total:.2e}',
              file=sys.stderr, flush=True)
    return out


def compare_seed(image_index: int, severity_index: int) -> int:
    """Seed of the comparison of image ``image_index`` at severity ``severity_index + 1``
    (the benchmark seeds dcls_mm's ``corrupt`` with the same number)."""
    return 1000 * image_index + severity_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('job', choices=('serve', 'compare'))
    parser.add_argument('images', help='.npy file of uint8 RGB images (N, H, W, 3)')
    parser.add_argument('--names', nargs='+', help='compare: corruption names')
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--ours', help='compare: folder of <corruption>.npy outputs of dcls_mm, '
                        '(images, 5, H, W, 3), seeded with compare_seed()')
    args = parser.parse_args()
    images = np.load(args.images)
    if args.job == 'serve':
        serve(images, args.repeats)
        return
    result = compare(images, args.names, args.ours)
    versions = dict(numpy=numpy.__version__, skimage=skimage.__version__,
                    imagecorruptions='1.1.2')
    print(json.dumps(dict(result=result, versions=versions)))


if __name__ == '__main__':
    main()
