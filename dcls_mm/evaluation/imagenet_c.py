"""ImageNet-C / ImageNet-C-bar: corruption names, AlexNet reference errors, and metrics.

Definitions (Hendrycks & Dietterich, ICLR 2019; Mintun et al., NeurIPS 2021), see
``README.md`` "Robustness":

* corruption error ``CE_c = sum_s E(c, s) / sum_s E_AlexNet(c, s)``; ``mCE`` is the mean
  of ``CE_c`` over the 15 benchmark corruptions;
* relative ``CE_c = sum_s (E(c, s) - E_clean) / sum_s (E_AlexNet(c, s) - E_AlexNet_clean)``;
* ImageNet-C-bar: the plain mean top-1 error over its 10 corruptions x 5 severities.

The AlexNet errors are keyed by corruption *name* (never by position in a list), so a
reordered or partial folder cannot pair a corruption with another one's reference.
Errors passed to and returned by the functions here are percentages (0-100).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

__all__ = [
    'BENCHMARK_CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'CORRUPTION_CATEGORIES',
    'ALEXNET_MEAN_ERROR', 'ALEXNET_CLEAN_ERROR', 'C_BAR_SEVERITY_PARAMS', 'SEVERITIES',
    'corruption_errors', 'relative_corruption_errors', 'summarize_imagenet_c',
    'summarize_imagenet_c_bar'
]

SEVERITIES = (1, 2, 3, 4, 5)

#: The 15 corruptions of the mCE, in the canonical order of the ImageNet-C paper.
BENCHMARK_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
    'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
    'elastic_transform', 'pixelate', 'jpeg_compression')
#: The 4 extra ("validation") corruptions: reported separately, never part of the mCE.
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')

#: Category folders that some ImageNet-C copies keep above the corruption folders.
CORRUPTION_CATEGORIES = {
    'noise': ('gaussian_noise', 'shot_noise', 'impulse_noise'),
    'blur': ('defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur'),
    'weather': ('snow', 'frost', 'fog', 'brightness'),
    'digital': ('contrast', 'elastic_transform', 'pixelate', 'jpeg_compression'),
    'extra': EXTRA_CORRUPTIONS,
}

#: AlexNet top-1 error (fraction) averaged over severities 1-5, per corruption.
ALEXNET_MEAN_ERROR: Dict[str, float] = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948,
    'zoom_blur': 0.798360, 'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324,
    'brightness': 0.564592, 'contrast': 0.853204, 'elastic_transform': 0.646056,
    'pixelate': 0.717840, 'jpeg_compression': 0.606500,
    # extra corruptions (for their own CE; not in the mCE)
    'speckle_noise': 0.845388, 'gaussian_blur': 0.787108, 'spatter': 0.717512,
    'saturate': 0.658248,
}
#: AlexNet clean top-1 error (fraction), the reference of the relative mCE.
ALEXNET_CLEAN_ERROR = 0.4348

#: ImageNet-C-bar corruptions -> the corruption parameter of severities 1..5, as the
#: authors' generator names the severity folders (formatted with two decimals there).
C_BAR_SEVERITY_PARAMS: Dict[str, tuple] = {
    'caustic_refraction': (2.35, 3.2, 4.9, 6.6, 9.15),
    'inverse_sparkles': (1, 2, 4, 9, 10),
    'sparkles': (1, 2, 3, 5, 6),
    'perlin_noise': (4.6, 5.2, 5.8, 7.6, 8.8),
    'blue_noise_sample': (0.8, 1.6, 2.4, 4.0, 5.6),
    'plasma_noise': (4.75, 7, 8.5, 9.25, 10),
    'checkerboard_cutout': (2, 3, 4, 5, 6),
    'cocentric_sine_waves': (3, 5, 8, 9, 10),
    'single_frequency_greyscale': (1, 1.5, 2, 4.5, 5),
    'brownish_noise': (1, 2, 3, 4, 5),
}

Errors = Mapping[str, Mapping[int, float]]


def _complete(errors: Errors, corruption: str) -> bool:
    return set(int(s) for s in errors.get(corruption, {})) >= set(SEVERITIES)


def _sev(errors: Errors, corruption: str) -> List[float]:
    by_int = {int(s): float(v) for s, v in errors[corruption].items()}
    return [by_int[s] for s in SEVERITIES]


def corruption_errors(errors: Errors) -> Dict[str, float]:
    """``CE_c`` (percent) of every corruption that has all 5 severities.

    Args:
        errors: ``{corruption: {severity: top-1 error %}}`` (severity keys int or str).

    Returns:
        ``{corruption: CE %}`` for corruptions with a known AlexNet error and all of
        severities 1-5; a corruption with missing severities gets no CE (a partial mean
        would not be comparable).
    """
    out = {}
    for corr in errors:
        if corr in ALEXNET_MEAN_ERROR and _complete(errors, corr):
            mean_err = sum(_sev(errors, corr)) / len(SEVERITIES)
            out[corr] = 100.0 * (mean_err / 100.0) / ALEXNET_MEAN_ERROR[corr]
    return out


def relative_corruption_errors(errors: Errors, clean_error: float) -> Dict[str, float]:
    """Relative ``CE_c`` (percent) for corruptions with all 5 severities.

    Args:
        errors: ``{corruption: {severity: top-1 error %}}``.
        clean_error: the model's clean ImageNet top-1 error, percent.

    Returns:
        ``{corruption: relative CE %}``.
    """
    out = {}
    for corr in errors:
        if corr in ALEXNET_MEAN_ERROR and _complete(errors, corr):
            ours = sum(e / 100.0 - clean_error / 100.0 for e in _sev(errors, corr))
            alexnet = len(SEVERITIES) * (ALEXNET_MEAN_ERROR[corr] - ALEXNET_CLEAN_ERROR)
            out[corr] = 100.0 * ours / alexnet
    return out


def summarize_imagenet_c(errors: Errors, clean_error: Optional[float] = None) -> dict:
    """ImageNet-C summary: mCE, relative mCE, CE per corruption, extra corruptions.

    Args:
        errors: ``{corruption: {severity: top-1 error %}}`` as evaluated.
        clean_error: clean top-1 error (percent) for the relative mCE; ``None`` leaves
            ``relative_mCE`` as ``None``.

    Returns:
        ``{"mCE", "relative_mCE", "CE", "relative_CE", "extra", "incomplete"}``:
        ``mCE``/``relative_mCE`` are ``None`` unless all 15 benchmark corruptions have all
        5 severities (``incomplete`` lists those that do not); ``CE`` holds the
        benchmark corruptions that are complete, in canonical order; ``extra`` holds the
        CE of the complete extra corruptions.
    """
    ce = corruption_errors(errors)
    rel = relative_corruption_errors(errors, clean_error) if clean_error is not None else {}
    incomplete = [c for c in BENCHMARK_CORRUPTIONS if c not in ce]
    bench_ce = {c: ce[c] for c in BENCHMARK_CORRUPTIONS if c in ce}
    complete = not incomplete
    n = len(BENCHMARK_CORRUPTIONS)
    return {
        'mCE': sum(bench_ce.values()) / n if complete else None,
        'relative_mCE': (sum(rel[c] for c in BENCHMARK_CORRUPTIONS) / n
                         if complete and clean_error is not None else None),
        'CE': bench_ce,
        'relative_CE': {c: rel[c] for c in BENCHMARK_CORRUPTIONS if c in rel},
        'extra': {c: ce[c] for c in EXTRA_CORRUPTIONS if c in ce},
        'incomplete': incomplete,
    }


def summarize_imagenet_c_bar(errors: Errors) -> dict:
    """ImageNet-C-bar summary: the plain mean error over its corruptions x severities.

    Args:
        errors: ``{corruption: {severity: top-1 error %}}``.

    Returns:
        ``{"mean_error", "incomplete"}``; ``mean_error`` is ``None`` unless all 10
        corruptions have all 5 severities.
    """
    incomplete = [c for c in C_BAR_SEVERITY_PARAMS if not _complete(errors, c)]
    if incomplete:
        return {'mean_error': None, 'incomplete': incomplete}
    values = [e for c in C_BAR_SEVERITY_PARAMS for e in _sev(errors, c)]
    return {'mean_error': sum(values) / len(values), 'incomplete': []}
