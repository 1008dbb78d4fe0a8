"""mCE, relative mCE and C-bar mean error against hand computation, and the class lists."""
import pytest

from dcls_mm.evaluation.folders import class_subset, imagenet_wnids
from dcls_mm.evaluation.imagenet_c import (ALEXNET_MEAN_ERROR, BENCHMARK_CORRUPTIONS,
                                           C_BAR_SEVERITY_PARAMS, EXTRA_CORRUPTIONS,
                                           summarize_imagenet_c, summarize_imagenet_c_bar)

# the AlexNet mean errors published with ImageNet-C (Hendrycks & Dietterich, ICLR 2019),
# typed here rather than imported from the code under test
REFERENCE_ALEXNET = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948,
    'zoom_blur': 0.798360, 'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324,
    'brightness': 0.564592, 'contrast': 0.853204, 'elastic_transform': 0.646056,
    'pixelate': 0.717840, 'jpeg_compression': 0.606500,
}


def test_constants_match_reference():
    assert list(BENCHMARK_CORRUPTIONS) == list(REFERENCE_ALEXNET)  # canonical order
    for name, value in REFERENCE_ALEXNET.items():
        assert ALEXNET_MEAN_ERROR[name] == value
    assert set(EXTRA_CORRUPTIONS) == {'speckle_noise', 'gaussian_blur', 'spatter', 'saturate'}
    assert C_BAR_SEVERITY_PARAMS['caustic_refraction'] == (2.35, 3.2, 4.9, 6.6, 9.15)
    assert len(C_BAR_SEVERITY_PARAMS) == 10


def _errors(per_corruption):
    return {c: {str(s + 1): e for s, e in enumerate(v)} for c, v in per_corruption.items()}


def test_mce_and_relative_mce_by_hand():
    # corruption k gets errors 30+k, 40+k, ..., 70+k (percent); clean error 20 %
    per = {c: [30 + k + 10 * s for s in range(5)] for k, c in enumerate(REFERENCE_ALEXNET)}
    errors = _errors(per)
    out = summarize_imagenet_c(errors, clean_error=20.0)
    ce_hand, rel_hand = {}, {}
    for k, (c, alex) in enumerate(REFERENCE_ALEXNET.items()):
        mean_err = (30 + k + 40 + k + 50 + k + 60 + k + 70 + k) / 5 / 100
        ce_hand[c] = 100 * mean_err / alex
        rel_hand[c] = 100 * (5 * mean_err - 5 * 0.20) / (5 * alex - 5 * 0.4348)
    assert out['CE'] == pytest.approx(ce_hand, rel=1e-12)
    assert out['relative_CE'] == pytest.approx(rel_hand, rel=1e-12)
    assert out['mCE'] == pytest.approx(sum(ce_hand.values()) / 15, rel=1e-12)
    assert out['relative_mCE'] == pytest.approx(sum(rel_hand.values()) / 15, rel=1e-12)
    assert out['incomplete'] == []
    # one worked value: gaussian noise errors 30..70 -> mean 0.5 / 0.886428
    assert out['CE']['gaussian_noise'] == pytest.approx(56.4061605, abs=1e-6)


def test_alexnet_itself_scores_100():
    errors = {c: {s: 100 * a for s in range(1, 6)} for c, a in REFERENCE_ALEXNET.items()}
    out = summarize_imagenet_c(errors, clean_error=43.48)
    assert out['mCE'] == pytest.approx(100.0)
    assert out['relative_mCE'] == pytest.approx(100.0)


def test_keyed_by_name_not_position():
    per = {c: [10 + k] * 5 for k, c in enumerate(REFERENCE_ALEXNET)}
    forward = summarize_imagenet_c(_errors(per))
    backward = summarize_imagenet_c(_errors(dict(reversed(list(per.items())))))
    assert forward['CE'] == pytest.approx(backward['CE'])
    assert forward['mCE'] == pytest.approx(backward['mCE'])
    assert list(backward['CE']) == list(REFERENCE_ALEXNET)  # reported in canonical order


def test_incomplete_gives_no_mce_and_extra_stays_out():
    per = {c: [50.0] * 5 for c in REFERENCE_ALEXNET}
    errors = _errors(per)
    errors['spatter'] = {str(s): 40.0 for s in range(1, 6)}
    full = summarize_imagenet_c(errors)
    assert full['extra'] == pytest.approx({'spatter': 100 * 0.40 / 0.717512})
    without_extra = summarize_imagenet_c(_errors(per))
    assert full['mCE'] == pytest.approx(without_extra['mCE'])  # extra never in the mCE
    assert full['relative_mCE'] is None  # no clean error given
    del errors['fog']['3']
    partial = summarize_imagenet_c(errors)
    assert partial['mCE'] is None and partial['incomplete'] == ['fog']
    assert 'fog' not in partial['CE'] and len(partial['CE']) == 14


def test_c_bar_mean_error():
    errors = {c: {str(s): 10.0 * k + s for s in range(1, 6)}
              for k, c in enumerate(C_BAR_SEVERITY_PARAMS)}
    hand = sum(10.0 * k + s for k in range(10) for s in range(1, 6)) / 50
    assert summarize_imagenet_c_bar(errors)['mean_error'] == pytest.approx(hand)
    del errors['sparkles']
    assert summarize_imagenet_c_bar(errors) == {'mean_error': None, 'incomplete': ['sparkles']}


def test_timm_class_lists():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == 'n01440764' and wnids[999] == 'n15075141'  # tench, toilet tissue
    for bench in ('imagenet-a', 'imagenet-r'):
        subset, indices = class_subset(bench)
        assert len(subset) == len(indices) == 200 and list(subset) == sorted(subset)
        assert all(wnids[i] == w for w, i in zip(subset, indices))
