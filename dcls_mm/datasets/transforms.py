"""Data transforms for OpenMMLab pipelines (mmdet 3.x, mmseg 1.x, mmpretrain).

Registered in dcls-mm's ``TRANSFORMS`` registry (a child of MMEngine's), so any config
builds them as ``type='dcls_mm.<Name>'``. Only MMCV / MMEngine are imported here, never
mmdet or mmseg.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from mmcv.transforms import BaseTransform

from dcls_mm.registry import TRANSFORMS

from .corruptions import CORRUPTION_SUBSETS, corrupt_bgr, image_seed

__all__ = ['Corrupt']


@TRANSFORMS.register_module()
class Corrupt(BaseTransform):
    """Corrupt the loaded image with an ImageNet-C corruption (:func:`corrupt_bgr`).

    Place it right after ``LoadImageFromFile`` (corruption at the stored resolution,
    before any resize), e.g.
    ``dict(type='dcls_mm.Corrupt', corruption='fog', severity=3, seed=0)``.

    Unlike mmdet's ``Corrupt`` (which hands MMCV's BGR image to a corruption written for
    RGB), the image is converted BGR -> RGB, corrupted, and converted back, so colour-
    dependent corruptions (frost, snow, spatter, saturate, brightness) are right. Each
    image's randomness comes from :func:`image_seed` (run seed, corruption, severity,
    file name): a run is reproducible and independent of the number of processes and
    of the image order, and equals the pre-generated copies of
    ``tools/robustness/make_corrupted.py`` with the same seed.

    Required keys: ``img`` (uint8 ``(H, W, 3)`` BGR), ``img_path`` (unless
    ``seed=None``). Modified keys: ``img``. Added keys: ``corruption``, ``severity``
    (add them to the packer's ``meta_keys`` to carry them into the data samples'
    metainfo).

    Args:
        corruption: one of ``corruption_names('all')``.
        severity: 1..5.
        seed: run seed from which per-image seeds derive; ``None`` draws fresh
            randomness for every image (not reproducible).

    Raises:
        ValueError: unknown corruption or severity outside 1..5 (when the pipeline is
            built); a missing ``img_path`` with a seed, or an image that is not uint8
            ``(H, W, 3)`` (when it runs).
    """

    def __init__(self, corruption: str, severity: int, seed: Optional[int] = 0) -> None:
        if corruption not in CORRUPTION_SUBSETS['all']:
            raise ValueError(f'Corrupt: unknown corruption {corruption!r}; known: '
                             f'{", ".join(CORRUPTION_SUBSETS["all"])}')
        if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
                or not 1 <= severity <= 5:
            raise ValueError(f'Corrupt: severity must be an integer in 1..5, got {severity!r}')
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f'Corrupt: seed must be a non-negative integer or None, got {seed!r}')
        self.corruption = corruption
        self.severity = int(severity)
        self.seed = None if seed is None else int(seed)

    def transform(self, results: Dict) -> Dict:
        """Corrupt ``results['img']`` in RGB and record the corruption."""
        path = results.get('img_path')
        if self.seed is None:
            seed = None
        elif not path:
            raise ValueError('Corrupt: results have no img_path to derive the per-image seed '
                             'from; load images from files or use seed=None')
        else:
            seed = image_seed(self.seed, self.corruption, self.severity, path)
        try:
            results['img'] = corrupt_bgr(results['img'], self.corruption, self.severity, seed)
        except ValueError as exc:
            raise ValueError(f'Corrupt({self.corruption}, {self.severity}) on '
                             f'{path or "an image"}: {exc}') from None
        results['corruption'] = self.corruption
        results['severity'] = self.severity
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(corruption={self.corruption!r}, '
                f'severity={self.severity}, seed={self.seed})')
