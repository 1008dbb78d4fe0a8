"""The 19 image corruptions of ImageNet-C / ``imagecorruptions`` 1.1.2, on today's stack.

``corrupt(image, corruption, severity, seed)`` reproduces the definitions and severity
parameters of ``imagecorruptions`` 1.1.2 (Michaelis et al. 2019, the package behind the
published COCO-C / Cityscapes-C numbers, itself a port of Hendrycks & Dietterich's
ImageNet-C code), written anew for NumPy 2, current SciPy / scikit-image / OpenCV /
Pillow:

- deterministic corruptions (defocus, zoom and gaussian blur, brightness, contrast,
  saturate, pixelate, JPEG) equal the reference up to floating-point rounding;
- random ones draw from ``np.random.default_rng(seed)`` (the reference uses NumPy's
  global state) with the reference's distributions, so a seed reproduces an image;
- glass blur's per-pixel Python loop is replaced by a vectorised replay of exactly the
  same sequential pixel moves (see :func:`_glass_shuffle`), zoom blur interpolates only
  the pixels it keeps, and motion blur is one OpenCV correlation: all 19 corruptions x 5
  severities run >10x faster than the reference (``tools/analysis/benchmark_corruptions.py``).

Frost overlays are the reference's own texture files, read from the installed
``imagecorruptions`` distribution's data (never imported: its modules fail on NumPy 2).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import math
import os
from typing import Callable, Dict, Optional, Tuple, Union

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import gaussian as sk_gaussian
from skimage.util import random_noise

__all__ = ['corrupt', 'corrupt_bgr', 'corruption_names', 'image_seed', 'CORRUPTION_SUBSETS',
           'DETERMINISTIC_CORRUPTIONS', 'SeedLike']

SeedLike = Union[None, int, np.random.Generator]

_BENCHMARK = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
              'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
              'elastic_transform', 'pixelate', 'jpeg_compression')
_EXTRA = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')

#: Named groups of corruption names, each in the canonical (ImageNet-C) order.
CORRUPTION_SUBSETS: Dict[str, Tuple[str, ...]] = {
    'benchmark': _BENCHMARK,
    'extra': _EXTRA,
    'all': _BENCHMARK + _EXTRA,
    'noise': _BENCHMARK[0:3],
    'blur': _BENCHMARK[3:7],
    'weather': _BENCHMARK[7:11],
    'digital': _BENCHMARK[11:15],
}

#: Corruptions without randomness (``seed`` is ignored for them).
DETERMINISTIC_CORRUPTIONS = frozenset({
    'defocus_blur', 'zoom_blur', 'gaussian_blur', 'brightness', 'contrast', 'saturate',
    'pixelate', 'jpeg_compression'
})

# Smallest side the reference accepts; below it pixelate's downscaled size and the glass
# blur's shuffle window degenerate.
MIN_SIDE = 32


def corruption_names(subset: str = 'benchmark') -> list[str]:
    """Names of the corruptions of a subset, in the canonical order.

    Args:
        subset: ``'benchmark'`` (the 15 of mCE / mPC), ``'extra'`` (speckle_noise,
            gaussian_blur, spatter, saturate), ``'all'`` (19), or a category:
            ``'noise'``, ``'blur'``, ``'weather'``, ``'digital'``.

    Returns:
        A new list of corruption names.

    Raises:
        ValueError: unknown subset.
    """
    if subset not in CORRUPTION_SUBSETS:
        raise ValueError(f'unknown corruption subset {subset!r}; choose one of '
                         f'{", ".join(CORRUPTION_SUBSETS)}')
    return list(CORRUPTION_SUBSETS[subset])


def image_seed(seed: int, corruption: str, severity: int, path: str) -> int:
    """The seed of one image's corruption, derived from a run seed and the image's name.

    Used by the ``dcls_mm.Corrupt`` transform and by ``make_corrupted`` alike, so that
    an image corrupted on the fly equals its pre-generated copy, whatever the number of
    processes or the order of the images. Only the file *name* enters (not its folder):
    the same image gets the same seed wherever the data set is mounted (COCO, ADE20K and
    ImageNet file names are unique within a split). Corruption and severity enter too,
    so that sets draw independent randomness, as separate reference runs would.

    Args:
        seed: the run's seed (a non-negative integer).
        corruption: corruption name.
        severity: 1..5.
        path: the image's path (or bare file name).

    Returns:
        A 64-bit non-negative integer seed.
    """
    name = os.path.basename(os.fspath(path))
    key = f'{int(seed)}\0{corruption}\0{int(severity)}\0{name}'.encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), 'little')


def corrupt(image: np.ndarray, corruption: str, severity: int,
            seed: SeedLike = None) -> np.ndarray:
    """Corrupt an RGB image as ``imagecorruptions`` 1.1.2 does.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image, H and W >= 32, any aspect ratio. Grey
            ``(H, W)`` / ``(H, W, 1)`` and RGBA ``(H, W, 4)`` images are refused (convert
            them first: the reference silently stacked grey images, and an alpha channel
            has no defined corruption).
        corruption: one of ``corruption_names('all')``.
        severity: 1..5.
        seed: seed (or a ``np.random.Generator``) of the corruption's randomness; the
            same seed gives the same output, ``None`` draws fresh randomness.
            Ignored by the :data:`DETERMINISTIC_CORRUPTIONS`.

    Returns:
        A new ``(H, W, 3)`` uint8 RGB array (values truncated to integers, as the
        reference's final ``np.uint8`` does).

    Raises:
        ValueError: unknown corruption, severity outside 1..5, or an image that is not
            ``(H, W, 3)`` uint8 with both sides >= 32.
    """
    fn = _CORRUPTIONS.get(corruption)
    if fn is None:
        raise ValueError(f'unknown corruption {corruption!r}; known: '
                         f'{", ".join(CORRUPTION_SUBSETS["all"])}')
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
            or not 1 <= severity <= 5:
        raise ValueError(f'severity must be an integer in 1..5, got {severity!r}')
    _check_image(image)
    out = fn(image, int(severity) - 1, np.random.default_rng(seed))
    # the reference's np.uint8(): truncation of the clipped float result
    return np.ascontiguousarray(out).astype(np.uint8)


def corrupt_bgr(image: np.ndarray, corruption: str, severity: int,
                seed: SeedLike = None) -> np.ndarray:
    """:func:`corrupt` for an OpenCV / MMCV image in BGR channel order.

    The corruption runs on the RGB image (colour-dependent corruptions such as frost,
    snow and saturate are defined in RGB) and the result is returned as BGR.

    Args:
        image: ``(H, W, 3)`` uint8 BGR image.
        corruption: corruption name.
        severity: 1..5.
        seed: as for :func:`corrupt`.

    Returns:
        A new contiguous ``(H, W, 3)`` uint8 BGR array.

    Raises:
        ValueError: as :func:`corrupt`.
    """
    if isinstance(image, np.ndarray) and image.ndim == 3:
        image = np.ascontiguousarray(image[..., ::-1])
    return np.ascontiguousarray(corrupt(image, corruption, severity, seed)[..., ::-1])


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f'image must be a numpy array, got {type(image).__name__}')
    if image.dtype != np.uint8:
        raise ValueError(f'image must be uint8 (0..255), got dtype {image.dtype}')
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(f'image of shape {image.shape} is grey; corruptions need (H, W, 3) '
                         'RGB: convert it first, e.g. np.repeat(grey.reshape(H, W, 1), 3, 2)')
    if image.ndim == 3 and image.shape[2] == 4:
        raise ValueError(f'image of shape {image.shape} has an alpha channel; corruptions '
                         'need (H, W, 3) RGB: drop or composite it first, e.g. '
                         'cv2.cvtColor(img, cv2.COLOR_RGBA2RGB)')
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image must have shape (H, W, 3), got {image.shape}')
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f'image is {image.shape[0]}x{image.shape[1]}; corruptions need both '
                         f'sides >= {MIN_SIDE} pixels')


# ----------------------------------------------------------------------------------
# helpers


def _gaussian_rgb(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's gaussian over H and W of an (H, W, 3) float image (the reference's
    ``gaussian(x, sigma, multichannel=True)``)."""
    return sk_gaussian(x, sigma=sigma, channel_axis=-1)


def _disk(radius: int, alias_blur: float) -> np.ndarray:
    """Antialiased, normalised disk kernel of the defocus blur."""
    if radius <= 8:
        L = np.arange(-8, 8 + 1)
        ksize = (3, 3)
    else:
        L = np.arange(-radius, radius + 1)
        ksize = (5, 5)
    X, Y = np.meshgrid(L, L)
    aliased = np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=np.float32)
    aliased /= np.sum(aliased)
    return cv2.GaussianBlur(aliased, ksize=ksize, sigmaX=alias_blur)


def _rgb_to_hsv(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation and value planes of a float RGB image in [0, 1].

    The same floating-point operations as ``skimage.color.rgb2hsv`` (hence the same
    numbers), on contiguous planes and without its per-mask copies.
    """
    r, g, b = (np.ascontiguousarray(x[..., i]) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    flat = delta == 0.0
    with np.errstate(invalid='ignore', divide='ignore'):
        s = delta / v
        # ties: blue's formula wins over green's, green's over red's (skimage's order)
        h = np.where(b == v, 4.0 + (r - g) / delta,
                     np.where(g == v, 2.0 + (b - r) / delta, (g - b) / delta))
    s[flat] = 0.0
    h /= 6.0
    h %= 1.0
    h[flat] = 0.0
    return h, s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RGB image of hue, saturation and value planes: the operations of
    ``skimage.color.hsv2rgb``, its 6-sector choice made per channel."""
    h6 = h * 6
    sector_float = np.floor(h6)
    f = h6 - sector_float
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = sector_float.astype(np.uint8) % 6
    out = np.empty(h.shape + (3,))
    out[..., 0] = np.choose(sector, (v, q, p, p, t, v))
    out[..., 1] = np.choose(sector, (t, v, v, q, p, p))
    out[..., 2] = np.choose(sector, (p, p, t, v, v, q))
    return out


def _linear_taps(n_in: int, n_zoomed: int, n_keep: int) -> Tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """Indices and weights of ``scipy.ndimage.zoom(order=1)`` along one axis.

    ``zoom`` maps output index ``o`` of ``n_zoomed`` to input coordinate
    ``o * (n_in - 1) / (n_zoomed - 1)``; only the first ``n_keep`` outputs are returned
    (zoom blur crops the zoomed image back to the input size).
    """
    scale = (n_in - 1) / (n_zoomed - 1) if n_zoomed > 1 else 1.0
    coord = np.arange(n_keep, dtype=np.float64) * scale
    lo = np.minimum(np.floor(coord).astype(np.intp), n_in - 1)
    t = coord - lo
    return lo, np.minimum(lo + 1, n_in - 1), t


def _clipped_zoom(img: np.ndarray, zoom: float, keep_input_size: bool = True) -> np.ndarray:
    """Zoom into the centre of ``img`` (H, W[, C]) by ``zoom`` with linear interpolation.

    Same as the reference's ``scipy.ndimage.zoom`` of the central ``ceil(H / zoom)``
    x ``ceil(W / zoom)`` crop (output ``round(crop * zoom)`` pixels per side), computed
    separably in ``img``'s precision and, with ``keep_input_size``, only for the first
    H x W output pixels that zoom blur keeps.
    """
    h, w = img.shape[:2]
    ch0, ch1 = int(np.ceil(h / float(zoom))), int(np.ceil(w / float(zoom)))
    top0, top1 = (h - ch0) // 2, (w - ch1) // 2
    crop = img[top0:top0 + ch0, top1:top1 + ch1]
    z0, z1 = int(round(ch0 * zoom)), int(round(ch1 * zoom))
    k0, k1 = (min(h, z0), min(w, z1)) if keep_input_size else (z0, z1)
    rest = crop.shape[2:]
    # both passes gather whole rows: the column pass runs on the transposed result
    lo, hi, t = _linear_taps(ch0, z0, k0)
    flat = crop.reshape(ch0, -1)
    rows = flat[lo]
    step = flat[hi]
    step -= rows
    step *= t.astype(img.dtype)[:, None]
    rows += step  # (1 - t) a + t b, as a + t (b - a): the same up to 1 ulp
    cols = rows.reshape(k0, ch1, -1).transpose(1, 0, 2)
    lo, hi, t = _linear_taps(ch1, z1, k1)
    out = cols[lo]
    step = cols[hi]
    step -= out
    step *= t.astype(img.dtype)[:, None, None]
    out += step
    out = out.transpose(1, 0, 2)  # a view: (k0, k1, channels)
    return out if rest else out[..., 0]


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """The reference's motion blur: a weighted sum of ``2 * radius + 1`` copies of ``x``
    shifted along ``angle`` with edge replication, as one sparse-kernel correlation."""
    width = radius * 2 + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
    k = k / np.sum(k)
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    taps = []
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break  # the reference stops once the shift leaves the image
        taps.append((dy, dx, k[i]))
    r = max(max(abs(dy), abs(dx)) for dy, dx, _ in taps)
    kernel = np.zeros((2 * r + 1, 2 * r + 1), np.float64)
    for dy, dx, weight in taps:
        # a shift by (dy, dx) reads x[row - dy, col - dx]: correlation tap at (r-dy, r-dx)
        kernel[r - dy, r - dx] += weight
    return cv2.filter2D(np.ascontiguousarray(x, np.float64), -1, kernel,
                        borderType=cv2.BORDER_REPLICATE)


def _plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] of side ``mapsize`` (a power of two)."""
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: centre = mean of the 4 corners + wibble
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + np.roll(corners, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        # diamonds: edge midpoints = mean of the 4 neighbours + wibble
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = ((centres + np.roll(centres, 1, axis=0))
                 + (corners + np.roll(corners, -1, axis=1)))
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = ((centres + np.roll(centres, 1, axis=1))
                 + (corners + np.roll(corners, -1, axis=0)))
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def _glass_shuffle(x: np.ndarray, max_delta: int, iterations: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Glass blur's local pixel shuffle, vectorised but move-for-move the reference's.

    The reference visits pixels (h, w) for h = H-d .. d+1 and, in each row,
    w = W-d .. d+1 (both descending), draws ``dx, dy`` uniform in [-d, d-1] and runs
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with (h', w') = (h+dy, w+dx). On NumPy
    arrays that statement is a *copy*, not a swap: the right-hand side holds views, so
    ``x[h', w']`` is written back with its own value. Each visit therefore sets pixel
    (h, w) to the *current* value at (h', w'), which is the value written there earlier
    in the pass if (h', w') was already visited, and its value before the pass otherwise.
    Following these "written earlier" links to their ends (pointer jumping, log-many
    vectorised steps) gives every visited pixel's source exactly.

    Randomness: per pass one ``rng.integers(-d, d, size=(n_visits, 2))`` array, columns
    (dx, dy), rows in visiting order.
    """
    h, w = x.shape[:2]
    d = max_delta
    rows = np.arange(h - d, d, -1)
    cols = np.arange(w - d, d, -1)
    visit = (rows[:, None] * w + cols[None, :]).ravel()  # flat positions in visiting order
    n = visit.size
    order = np.arange(n)
    visit_time = np.full(h * w, n, dtype=np.intp)  # n = never visited
    visit_time[visit] = order
    source = np.arange(h * w)  # source[p]: pixel of the input now at flat position p
    for _ in range(iterations):
        delta = rng.integers(-d, d, size=(n, 2))
        target = visit + delta[:, 1] * w + delta[:, 0]
        earlier = visit_time[target]
        # link t -> the visit that last wrote its target (or itself: read the pass input)
        link = np.where(earlier < order, earlier, order)
        while True:
            nxt = link[link]
            if np.array_equal(nxt, link):
                break
            link = nxt
        source[visit] = source[target[link]]
    return x.reshape(h * w, -1)[source].reshape(x.shape)


@functools.lru_cache(maxsize=None)
def _frost_texture(index: int) -> np.ndarray:
    """The reference's frost texture ``index`` (0..4) as BGR uint8, read from the
    installed ``imagecorruptions`` distribution's files without importing it."""
    name = ['frost1.png', 'frost2.png', 'frost3.png', 'frost4.jpg', 'frost5.jpg'][index]
    try:
        dist = importlib.metadata.distribution('imagecorruptions')
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            'frost needs the frost textures of imagecorruptions 1.1.2: install it without '
            'its stale dependencies, `pip install --no-deps imagecorruptions==1.1.2` '
            '(tools/env/setup.sh does)') from None
    path = dist.locate_file(f'imagecorruptions/frost/{name}')
    texture = cv2.imread(str(path))
    if texture is None:
        raise RuntimeError(f'frost texture {path} is missing or unreadable; reinstall '
                           'imagecorruptions==1.1.2 (--no-deps)')
    return texture


@functools.lru_cache(maxsize=10)  # the 5 textures at 2 image sizes; up to ~8 MB each
def _frost_rescaled(index: int, h: int, w: int) -> np.ndarray:
    """Frost texture ``index`` scaled (bicubic) so that a random H x W crop fits."""
    frost = _frost_texture(index)
    fh, fw = frost.shape[:2]
    scale = 1.0
    if fh < h and fw >= w:
        scale = h / fh
    elif fh >= h and fw < w:
        scale = w / fw
    elif fh < h and fw < w:
        scale = max(h / fh, w / fw)
    scale *= 1.1
    size = (int(np.ceil(fw * scale)), int(np.ceil(fh * scale)))
    return cv2.resize(frost, dsize=size, interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------------
# corruptions: (uint8 RGB image, severity index 0..4, generator) -> float or uint8 image
# Severity parameters are those of imagecorruptions 1.1.2.


def gaussian_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [.08, .12, 0.18, 0.26, 0.38][s]
    x = x / 255.
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [60, 25, 12, 5, 3][s]
    x = x / 255.
    return np.clip(rng.poisson(x * c) / float(c), 0, 1) * 255


def impulse_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [.03, .06, .09, 0.17, 0.27][s]
    x = random_noise(x / 255., mode='s&p', amount=c, rng=rng)
    return np.clip(x, 0, 1) * 255


def speckle_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [.15, .2, 0.35, 0.45, 0.6][s]
    x = x / 255.
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def gaussian_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [1, 2, 3, 4, 6][s]
    return np.clip(_gaussian_rgb(x / 255., c), 0, 1) * 255


def glass_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    sigma, max_delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2),
                                    (1.5, 4, 2)][s]
    x = np.uint8(_gaussian_rgb(x / 255., sigma) * 255)
    x = _glass_shuffle(x, max_delta, iterations, rng)
    return np.clip(_gaussian_rgb(x / 255., sigma), 0, 1) * 255


def defocus_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][s]
    x = x / 255.
    kernel = _disk(radius, alias_blur)
    out = np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], axis=2)
    return np.clip(out, 0, 1) * 255


def motion_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][s]
    angle = rng.uniform(-45, 45)
    return np.clip(_motion_blur(x, radius, sigma, angle), 0, 255)


def zoom_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    zooms = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
             np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][s]
    x = (x / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for zoom in zooms:
        # float32 layers, as the reference's (scipy interpolates in float64 and casts:
        # at most 1 ulp apart)
        out += _clipped_zoom(x, zoom)
    x = (x + out) / (len(zooms) + 1)
    return np.clip(x, 0, 1) * 255


def snow(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, thresh, radius, sigma, blend = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][s]
    h, w = x.shape[:2]
    x = np.array(x, dtype=np.float32) / 255.
    layer = rng.normal(size=(h, w), loc=loc, scale=scale)
    # the whole zoomed layer is blurred, then cropped (as in the reference)
    layer = _clipped_zoom(layer, zoom, keep_input_size=False)
    layer[layer < thresh] = 0
    layer = np.clip(layer, 0, 1)
    layer = _motion_blur(layer, radius, sigma, rng.uniform(-135, -45))
    layer = np.round(layer * 255).astype(np.uint8) / 255.
    layer = layer[:h, :w, np.newaxis]
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(h, w, 1)
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def frost(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    a, b = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][s]
    h, w = x.shape[:2]
    # the reference lists six files but draws randint(5): frost6 is never used
    texture = _frost_rescaled(int(rng.integers(5)), h, w)
    top = rng.integers(0, texture.shape[0] - h)
    left = rng.integers(0, texture.shape[1] - w)
    overlay = texture[top:top + h, left:left + w][..., [2, 1, 0]]  # BGR file -> RGB
    return np.clip(a * x + b * overlay, 0, 255)


def fog(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)][s]
    h, w = x.shape[:2]
    map_size = 1 << (max(h, w) - 1).bit_length()
    x = x / 255.
    max_val = x.max()
    x += strength * _plasma_fractal(map_size, decay, rng)[:h, :w][..., np.newaxis]
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


def spatter(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, sigma, thresh, intensity, mud = [
        (0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1)][s]
    x = np.array(x, dtype=np.float32) / 255.
    liquid = rng.normal(size=x.shape[:2], loc=loc, scale=scale)
    liquid = sk_gaussian(liquid, sigma=sigma)
    liquid[liquid < thresh] = 0
    if mud == 0:  # water drops, pale turquoise
        liquid = (liquid * 255).astype(np.uint8)
        dist = 255 - cv2.Canny(liquid, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
        dist = cv2.equalizeHist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = cv2.filter2D(dist, cv2.CV_8U, ker)
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
        m /= np.max(m, axis=(0, 1))
        m *= intensity
        ones = np.ones_like(m[..., :1])
        colour = np.concatenate((175 / 255. * ones, 238 / 255. * ones, 238 / 255. * ones),
                                axis=2)
        colour = cv2.cvtColor(colour, cv2.COLOR_BGR2BGRA)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        return cv2.cvtColor(np.clip(x + m * colour, 0, 1), cv2.COLOR_BGRA2BGR) * 255
    # mud, brown
    m = np.where(liquid > thresh, 1, 0)
    m = sk_gaussian(m.astype(np.float32), sigma=intensity)
    m[m < 0.8] = 0
    ones = np.ones_like(x[..., :1])
    colour = np.concatenate((63 / 255. * ones, 42 / 255. * ones, 20 / 255. * ones), axis=2)
    colour *= m[..., np.newaxis]
    x *= (1 - m[..., np.newaxis])
    return np.clip(x + colour, 0, 1) * 255


def contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.4, .3, .2, .1, .05][s]
    x = x / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [.1, .2, .3, .4, .5][s]
    h, sat, v = _rgb_to_hsv(x / 255.)
    return np.clip(_hsv_to_rgb(h, sat, np.clip(v + c, 0, 1)), 0, 1) * 255


def saturate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    scale, shift = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][s]
    h, sat, v = _rgb_to_hsv(x / 255.)
    return np.clip(_hsv_to_rgb(h, np.clip(sat * scale + shift, 0, 1), v), 0, 1) * 255


def jpeg_compression(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    quality = [25, 18, 15, 10, 7][s]
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, 'JPEG', quality=quality)
    return np.asarray(Image.open(buf).convert('RGB'))


def pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.6, 0.5, 0.4, 0.3, 0.25][s]
    h, w = x.shape[:2]
    img = Image.fromarray(x).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.asarray(img.resize((w, h), Image.Resampling.NEAREST))


def elastic_transform(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    image = np.array(x, dtype=np.float32) / 255.
    h, w = image.shape[:2]
    sigma = np.array((h, w)) * 0.01
    alpha = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12][s]
    # the reference scales both displacement ranges by the height
    max_dx = max_dy = h * 0.005
    dx = (sk_gaussian(rng.uniform(-max_dx, max_dx, size=(h, w)), sigma, mode='reflect',
                      truncate=3) * alpha).astype(np.float32)
    dy = (sk_gaussian(rng.uniform(-max_dy, max_dy, size=(h, w)), sigma, mode='reflect',
                      truncate=3) * alpha).astype(np.float32)
    gx, gy = np.meshgrid(np.arange(w), np.arange(h))
    coords = np.stack([gy + dy, gx + dx])
    # per channel: the reference's 3-D map has integer channel coordinates
    out = np.stack([ndimage.map_coordinates(image[..., ch], coords, order=1, mode='reflect')
                    for ch in range(3)], axis=2)
    return np.clip(out, 0, 1) * 255


_CORRUPTIONS: Dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    name: globals()[name] for name in CORRUPTION_SUBSETS['all']
}
