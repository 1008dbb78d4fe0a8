"""dcls_mm.datasets.corruptions: contract, hand-checked cases, exactness of the fast paths
against plain re-statements of the reference's loops, seeding, errors."""
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from dcls_mm.datasets import corruptions as C
from dcls_mm.datasets.corruptions import corrupt, corruption_names, image_seed

ALL = corruption_names('all')


def photo_like(h, w, seed=0):
    """Smooth colour waves plus fine texture: a small stand-in for a photograph."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform()))
                     * np.cos(2 * np.pi * rng.uniform(0.5, 3) * yy) for _ in range(3)], 2)
    texture = cv2.GaussianBlur(rng.normal(size=(h, w, 3)), (0, 0), 1.5)
    return np.clip(127.5 + 90 * base + 60 * texture, 0, 255).astype(np.uint8)


IMAGES = [photo_like(48, 64, 0), photo_like(40, 33 + 17, 1)]


# ----------------------------------------------------------------------------- names
def test_subsets_canonical_order():
    benchmark = ['gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur',
                 'glass_blur', 'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog',
                 'brightness', 'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression']
    extra = ['speckle_noise', 'gaussian_blur', 'spatter', 'saturate']
    assert corruption_names() == benchmark
    assert corruption_names('extra') == extra
    assert corruption_names('all') == benchmark + extra
    cats = [corruption_names(c) for c in ('noise', 'blur', 'weather', 'digital')]
    assert [len(c) for c in cats] == [3, 4, 4, 4]
    assert sum(cats, []) == benchmark
    with pytest.raises(ValueError, match="unknown corruption subset 'common'"):
        corruption_names('common')


# ----------------------------------------------------------------- shape and amount
@pytest.mark.parametrize('name', ALL)
def test_every_severity_keeps_shape_dtype_and_changes_the_image(name):
    for img in IMAGES:
        for severity in range(1, 6):
            out = corrupt(img, name, severity, seed=severity)
            assert out.shape == img.shape and out.dtype == np.uint8
            assert out.flags['C_CONTIGUOUS']
            assert np.abs(out.astype(int) - img).mean() > 0.5, (name, severity)


# The reference's parameters make the change grow with severity for every corruption
# except a few, by their definition: glass blur (sev 2 shuffles once with delta 2, sev 1
# twice with delta 1), frost (the image's weight falls while the overlay's rises) and
# saturate (sev 1-2 desaturate, 3-5 saturate) have their own tests; snow's severities 2
# and 3 (many small flakes vs fewer, larger ones) change an image by about as much.
NOT_MONOTONE = {'glass_blur', 'frost', 'saturate'}
CHAINS = {'snow': [(1, 2, 4, 5), (1, 3, 4, 5)]}


@pytest.mark.parametrize('name', [n for n in ALL if n not in NOT_MONOTONE])
def test_change_grows_with_severity(name):
    change = {s: np.mean([np.abs(corrupt(img, name, s, seed=k).astype(float) - img).mean()
                          for img in IMAGES for k in range(3)]) for s in range(1, 6)}
    for chain in CHAINS.get(name, [(1, 2, 3, 4, 5)]):
        assert all(change[b] > change[a] for a, b in zip(chain, chain[1:])), change


def test_glass_blur_severity_5_changes_more_than_1():
    change = [np.abs(corrupt(IMAGES[0], 'glass_blur', s, seed=0).astype(float)
                     - IMAGES[0]).mean() for s in (1, 5)]
    assert change[1] > 1.3 * change[0]


def test_frost_on_black_is_the_scaled_rgb_texture():
    """On a black image frost = floor(b_s * overlay): the same crop at every severity
    (same seed), scaled by 0.4, 0.6, 0.7, 0.7, 0.75; the textures are bluish in their
    BGR files, so the RGB output must have more blue than red."""
    black = np.zeros((48, 64, 3), np.uint8)
    outs = [corrupt(black, 'frost', s, seed=3).astype(float) for s in range(1, 6)]
    weights = [0.4, 0.6, 0.7, 0.7, 0.75]
    overlay = outs[-1] / weights[-1]
    for out, b in zip(outs, weights):
        assert np.abs(out - b * overlay).max() <= 1.0 + 1e-9
    assert outs[4][..., 2].mean() > outs[4][..., 0].mean() + 5
    with pytest.raises(AssertionError):  # another seed picks another crop/texture
        np.testing.assert_array_equal(corrupt(black, 'frost', 5, seed=4), outs[4])


def test_saturate_hand_checked():
    """RGB (200, 100, 100): V = 200/255, S = 0.5, H = 0. Saturation becomes 0.15, 0.05,
    1, 1, 1 -> G = B = V (1 - S) * 255 = 170, 190, 0, 0, 0 (R stays 200)."""
    img = np.empty((32, 32, 3), np.uint8)
    img[:] = (200, 100, 100)
    for severity, gb in zip(range(1, 6), (170, 190, 0, 0, 0)):
        out = corrupt(img, 'saturate', severity)
        assert np.abs(out.astype(int) - (200, gb, gb)).max() <= 1, (severity, out[0, 0])


# -------------------------------------------------------------- hand-checked cases
def test_contrast_hand_checked():
    """Half 0, half 255: mean 0.5; (x - 0.5) * c + 0.5 for c = 0.4 .. 0.05."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255
    for severity, c in zip(range(1, 6), (0.4, 0.3, 0.2, 0.1, 0.05)):
        out = corrupt(img, 'contrast', severity)
        assert abs(int(out[0, 0, 0]) - (0.5 - 0.5 * c) * 255) <= 1
        assert abs(int(out[0, 31, 0]) - (0.5 + 0.5 * c) * 255) <= 1


def test_brightness_hand_checked():
    """Grey 100: V + c; RGB (100, 50, 0): scaled by (V + c) / V (hue and saturation
    kept); pure red already has V = 1 and stays."""
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :16] = 100
    img[:, 16:32] = (100, 50, 0)
    img[:, 32:] = (255, 0, 0)
    for severity, c in zip(range(1, 6), (.1, .2, .3, .4, .5)):
        out = corrupt(img, 'brightness', severity).astype(int)
        v = min(1.0, 100 / 255 + c) * 255
        assert np.abs(out[0, 0] - v).max() <= 1
        assert np.abs(out[0, 20] - np.array([v, v / 2, 0])).max() <= 1
        assert (out[0, 40] == (255, 0, 0)).all()


def test_pixelate_hand_checked():
    """Columns alternate 0 / 200; severity 5 averages 4x4 blocks (box filter at 1/4)
    and blows them up again: 100 everywhere. A picture made of 4x4 constant blocks
    comes back unchanged."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, ::2] = 200
    assert (corrupt(img, 'pixelate', 5) == 100).all()
    blocks = np.kron(np.random.default_rng(0).integers(0, 256, (8, 8, 3)),
                     np.ones((4, 4, 1))).astype(np.uint8)
    assert (corrupt(blocks, 'pixelate', 5) == blocks).all()


def test_gaussian_blur_impulse_hand_checked():
    """A single 255 pixel: the centre keeps 255 * g0^2, g0 = 1 / sum_k exp(-k^2 / 2 s^2)
    over |k| <= round(4 s) (scikit-image / SciPy truncate the kernel at 4 sigma)."""
    img = np.zeros((33, 33, 3), np.uint8)
    img[16, 16] = 255
    for severity, sigma in zip(range(1, 6), (1, 2, 3, 4, 6)):
        radius = int(4 * sigma + 0.5)
        g0 = 1 / sum(math.exp(-k * k / (2 * sigma * sigma)) for k in range(-radius, radius + 1))
        out = corrupt(img, 'gaussian_blur', severity)
        assert abs(int(out[16, 16, 0]) - 255 * g0 * g0) <= 1, severity
        assert (out[..., 0] == out[..., 1]).all()


def test_constant_image_is_kept_by_the_blurs():
    img = np.full((40, 48, 3), 120, np.uint8)
    for name in ('gaussian_blur', 'defocus_blur', 'zoom_blur'):
        for severity in (1, 5):
            out = corrupt(img, name, severity).astype(int)
            assert np.abs(out - 120).max() <= 1, (name, severity)


def test_jpeg_of_a_grey_image_hand_checked():
    """Grey 120 is only a DC term: 8 * (120 - 128) = -64, quantised with libjpeg's luma
    DC step for quality q < 50, (16 * (5000 // q) + 50) // 100: q = 25 -> 32 (exact),
    18 -> 44, 15 -> 53, 10 -> 80, 7 -> 114 (-64 -> -114, grey 113.75)."""
    img = np.full((32, 40, 3), 120, np.uint8)
    for severity, q in zip(range(1, 6), (25, 18, 15, 10, 7)):
        step = (16 * (5000 // q) + 50) // 100
        want = 128 + round(-64 / step) * step / 8
        out = corrupt(img, 'jpeg_compression', severity).astype(int)
        assert np.abs(out - want).max() <= 1, (severity, out[0, 0], want)


def test_noise_amounts():
    """Mid-grey input: Gaussian noise has std c; shot noise has std sqrt(x c) / c;
    impulse noise sets a fraction c of the values to 0 or 255 (half each)."""
    grey = np.full((128, 128, 3), 128, np.uint8)
    x = 128 / 255
    for severity, c in zip((1, 2), (.08, .12)):
        d = (corrupt(grey, 'gaussian_noise', severity, seed=0) / 255. - x)
        assert abs(d.std() - c) < 0.05 * c
    for severity, c in zip((1, 2), (60, 25)):
        d = corrupt(grey, 'shot_noise', severity, seed=0) / 255.
        assert abs(d.std() - math.sqrt(x * c) / c) < 0.05 * math.sqrt(x * c) / c
    for severity, c in zip((1, 3, 5), (.03, .09, .27)):
        out = corrupt(grey, 'impulse_noise', severity, seed=0)
        salt, pepper = (out == 255).mean(), (out == 0).mean()
        assert abs(salt + pepper - c) < 0.1 * c and abs(salt - pepper) < 0.15 * c


# ------------------------------------------------- fast paths vs the reference's loops
def reference_glass_shuffle(x, d, iterations, rng):
    """The reference's loop, with its statement ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``
    on NumPy rows (which copies rather than swaps) and the draws of _glass_shuffle."""
    x = x.copy()
    h_, w_ = x.shape[:2]
    for _ in range(iterations):
        n = (h_ - 2 * d) * (w_ - 2 * d)
        draws = iter(rng.integers(-d, d, size=(n, 2)))
        for h in range(h_ - d, d, -1):
            for w in range(w_ - d, d, -1):
                dx, dy = next(draws)
                hp, wp = h + dy, w + dx
                x[h, w], x[hp, wp] = x[hp, wp], x[h, w]
    return x


@pytest.mark.parametrize('d,iterations', [(1, 2), (2, 3), (4, 2)])
def test_glass_shuffle_replays_the_reference_loop(d, iterations):
    x = np.random.default_rng(5).integers(0, 256, (21, 34, 3)).astype(np.uint8)
    got = C._glass_shuffle(x, d, iterations, np.random.default_rng(9))
    want = reference_glass_shuffle(x, d, iterations, np.random.default_rng(9))
    np.testing.assert_array_equal(got, want)


def reference_shift(image, dx, dy):
    """The reference's shift: translate by (dx, dy), repeating the edge row/column."""
    h, w = image.shape[:2]
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            out[r, c] = image[min(max(r - dy, 0), h - 1), min(max(c - dx, 0), w - 1)]
    return out


def test_motion_blur_equals_sum_of_shifted_copies():
    x = np.random.default_rng(1).integers(0, 256, (36, 40, 3)).astype(np.uint8)
    radius, sigma, angle = 10, 3, 27.0
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    point = (width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle)))
    hyp = math.hypot(*point)
    want = np.zeros(x.shape)
    for i in range(width):
        dy = -math.ceil(i * point[0] / hyp - 0.5)
        dx = -math.ceil(i * point[1] / hyp - 0.5)
        want += k[i] * reference_shift(x, dx, dy)
    np.testing.assert_allclose(C._motion_blur(x, radius, sigma, angle), want, atol=1e-9)


@pytest.mark.parametrize('shape', [(37, 53), (64, 48), (50, 50)])
@pytest.mark.parametrize('zoom', [1.01, 1.1, 1.16, 1.28, 2.5, 4.5])
def test_clipped_zoom_equals_scipy_zoom(shape, zoom):
    """The reference zooms the central crop with scipy.ndimage.zoom(order=1)."""
    x = np.random.default_rng(2).random(shape + (3,)).astype(np.float32)
    h, w = shape
    ch0, ch1 = math.ceil(h / zoom), math.ceil(w / zoom)
    top0, top1 = (h - ch0) // 2, (w - ch1) // 2
    full = ndimage.zoom(x[top0:top0 + ch0, top1:top1 + ch1], (zoom, zoom, 1), order=1)
    np.testing.assert_allclose(C._clipped_zoom(x, zoom, keep_input_size=False), full,
                               atol=1e-6)
    np.testing.assert_allclose(C._clipped_zoom(x, zoom), full[:h, :w], atol=1e-6)


# ------------------------------------------------------------------------ seeding
RANDOM = [n for n in ALL if n not in C.DETERMINISTIC_CORRUPTIONS]


@pytest.mark.parametrize('name', RANDOM)
def test_seeded_determinism(name):
    img = IMAGES[1]
    a = corrupt(img, name, 3, seed=11)
    np.testing.assert_array_equal(a, corrupt(img, name, 3, seed=11))
    np.testing.assert_array_equal(a, corrupt(img, name, 3, seed=np.random.default_rng(11)))
    assert not np.array_equal(a, corrupt(img, name, 3, seed=12))


def test_unseeded_draws_fresh_randomness():
    img = IMAGES[0]
    assert not np.array_equal(corrupt(img, 'gaussian_noise', 1),
                              corrupt(img, 'gaussian_noise', 1))


def test_deterministic_ones_ignore_the_seed():
    for name in C.DETERMINISTIC_CORRUPTIONS:
        np.testing.assert_array_equal(corrupt(IMAGES[0], name, 2, seed=1),
                                      corrupt(IMAGES[0], name, 2, seed=2))


def test_image_seed_uses_the_file_name_corruption_and_severity():
    s = image_seed(0, 'fog', 3, '/data/coco/val2017/000000000139.jpg')
    assert s == image_seed(0, 'fog', 3, 'elsewhere/000000000139.jpg')
    assert s == image_seed(0, 'fog', 3, '000000000139.jpg')
    others = {image_seed(1, 'fog', 3, '000000000139.jpg'),
              image_seed(0, 'snow', 3, '000000000139.jpg'),
              image_seed(0, 'fog', 4, '000000000139.jpg'),
              image_seed(0, 'fog', 3, '000000000285.jpg')}
    assert s not in others and len(others) == 4
    assert 0 <= s < 2 ** 64


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize('severity', [0, 6, -1, 2.0, True, '3'])
def test_bad_severity(severity):
    with pytest.raises(ValueError, match='severity must be an integer in 1..5'):
        corrupt(IMAGES[0], 'fog', severity)


def test_unknown_corruption():
    with pytest.raises(ValueError, match="unknown corruption 'haze'; known: gaussian_noise"):
        corrupt(IMAGES[0], 'haze', 1)


@pytest.mark.parametrize('image,message', [
    (np.zeros((40, 40), np.uint8), 'is grey'),
    (np.zeros((40, 40, 1), np.uint8), 'is grey'),
    (np.zeros((40, 40, 4), np.uint8), 'has an alpha channel'),
    (np.zeros((40, 40, 2), np.uint8), r'must have shape \(H, W, 3\)'),
    (np.zeros((40, 40, 3), np.float32), 'must be uint8'),
    (np.zeros((31, 64, 3), np.uint8), 'both sides >= 32'),
    ([[0, 0, 0]], 'must be a numpy array'),
])
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        corrupt(image, 'contrast', 1)


def test_bgr_wrapper_corrupts_in_rgb():
    bgr = IMAGES[0]
    out = C.corrupt_bgr(bgr, 'snow', 2, seed=1)
    np.testing.assert_array_equal(out, corrupt(bgr[..., ::-1].copy(), 'snow', 2,
                                               seed=1)[..., ::-1])


def test_large_non_square_image():
    img = photo_like(300, 1100, 4)  # wider than every frost texture
    for name in ('frost', 'fog', 'glass_blur', 'zoom_blur', 'snow', 'elastic_transform'):
        assert corrupt(img, name, 5, seed=0).shape == img.shape


def test_hsv_round_trip_equals_scikit_image():
    """brightness/saturate convert with the same operations as scikit-image (the
    reference's library): identical floats, ties and grey pixels included."""
    from skimage import color
    x = np.random.default_rng(3).integers(0, 256, (24, 40, 3)).astype(np.uint8)
    x[:4] = 90
    x[4:8, :, 0] = x[4:8, :, 1]
    x[8:12, :, 2] = x[8:12, :, 1]
    x[12:14] = 0
    f = x / 255.
    h, s, v = C._rgb_to_hsv(f)
    np.testing.assert_array_equal(np.stack([h, s, v], -1), color.rgb2hsv(f))
    s2, v2 = np.clip(s * 5 + 0.1, 0, 1), np.clip(v + 0.3, 0, 1)
    np.testing.assert_array_equal(C._hsv_to_rgb(h, s2, v2),
                                  color.hsv2rgb(np.stack([h, s2, v2], -1)))
