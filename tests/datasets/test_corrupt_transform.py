"""dcls_mm.Corrupt inside real mmdet 3.3 / mmseg 1.2 test pipelines on demo data in the
real COCO / ADE20K formats."""
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from dcls_mm.datasets import corrupt, image_seed
from dcls_mm.datasets.transforms import Corrupt

# the suite's demo data sets (session fixtures, shared with the integration tests)
from ..integration.conftest import ade_demo as ade  # noqa: F401
from ..integration.conftest import coco_demo as coco  # noqa: F401

META = ('img_id', 'img_path', 'ori_shape', 'img_shape', 'corruption', 'severity')


def expected_bgr(path, corruption, severity, seed):
    """Independent statement of the transform: decode as MMCV does (OpenCV, BGR), corrupt
    the RGB image with the per-image seed, back to BGR."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    rgb = corrupt(np.ascontiguousarray(bgr[..., ::-1]), corruption, severity,
                  seed=image_seed(seed, corruption, severity, path))
    return rgb[..., ::-1]


def test_mmdet_coco_test_pipeline(coco):
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='dcls_mm.Corrupt', corruption='frost', severity=4, seed=7),
                dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                dict(type='PackDetInputs', meta_keys=META)]
    dataset = DATASETS.build(dict(
        type='CocoDataset', data_root=coco['data_root'], ann_file=coco['val_ann'],
        data_prefix=dict(img=coco['val_img']), metainfo=dict(classes=coco['classes']),
        test_mode=True, pipeline=pipeline))
    assert len(dataset) == 2
    for i in range(2):
        sample = dataset[i]
        meta = sample['data_samples'].metainfo
        assert meta['corruption'] == 'frost' and meta['severity'] == 4
        want = expected_bgr(meta['img_path'], 'frost', 4, 7)
        got = sample['inputs'].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want)
        # mmdet's own Corrupt corrupts MMCV's BGR array as if it were RGB: frost's
        # overlay colours come out swapped, which this transform avoids
        seed = image_seed(7, 'frost', 4, meta['img_path'])
        naive = corrupt(cv2.imread(meta['img_path']), 'frost', 4, seed=seed)
        assert np.abs(naive.astype(int) - want).mean() > 2
    # image 1 alone, before image 0: the per-image seed, not the order, decides (so
    # any number of processes gives the same images)
    first = DATASETS.build(dict(
        type='CocoDataset', data_root=coco['data_root'], ann_file=coco['val_ann'],
        data_prefix=dict(img=coco['val_img']), metainfo=dict(classes=coco['classes']),
        test_mode=True, pipeline=pipeline))[1]['inputs']
    np.testing.assert_array_equal(first, dataset[1]['inputs'])


def test_mmseg_ade20k_test_pipeline(ade):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    init_default_scope('mmseg')
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='dcls_mm.Corrupt', corruption='snow', severity=2, seed=0),
                dict(type='LoadAnnotations', reduce_zero_label=True),
                dict(type='PackSegInputs', meta_keys=META)]
    dataset = DATASETS.build(dict(
        type='ADE20KDataset', data_root=ade['data_root'],
        data_prefix=dict(img_path=ade['val_img'], seg_map_path=ade['val_seg']),
        test_mode=True, pipeline=pipeline))
    assert len(dataset) == 2
    for i in range(2):
        sample = dataset[i]
        meta = sample['data_samples'].metainfo
        assert (meta['corruption'], meta['severity']) == ('snow', 2)
        want = expected_bgr(meta['img_path'], 'snow', 2, 0)
        np.testing.assert_array_equal(sample['inputs'].permute(1, 2, 0).numpy(), want)
        # annotations untouched: the label map is the PNG's, minus 1 (reduce_zero_label)
        seg_path = osp.join(ade['data_root'], ade['val_seg'],
                            osp.basename(meta['img_path'])[:-4] + '.png')
        label = np.asarray(Image.open(seg_path)).astype(int)
        expect = np.where(label == 0, 255, label - 1)
        np.testing.assert_array_equal(sample['data_samples'].gt_sem_seg.data[0].numpy(), expect)


def test_scoped_type_resolves_in_a_fresh_process():
    """``type='dcls_mm.Corrupt'`` in an mmdet or mmseg pipeline, with nothing of dcls_mm
    imported beforehand: the registry's ``locations`` import the transform."""
    code = (
        'import sys\n'
        'from mmengine.dataset import Compose\n'
        'from mmengine.registry import init_default_scope\n'
        'import mmdet.datasets, mmseg.datasets\n'
        "assert 'dcls_mm.datasets' not in sys.modules\n"
        "for scope in ('mmdet', 'mmseg'):\n"
        '    init_default_scope(scope)\n'
        "    p = Compose([dict(type='LoadImageFromFile'),\n"
        "                 dict(type='dcls_mm.Corrupt', corruption='fog', severity=1)])\n"
        '    print(scope, type(p.transforms[1]).__module__, p.transforms[1])\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines == [f"{s} dcls_mm.datasets.transforms Corrupt(corruption='fog', severity=1, "
                     'seed=0)' for s in ('mmdet', 'mmseg')]


def test_transform_errors():
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        Corrupt('rain', 1)
    for severity in (0, 6):
        with pytest.raises(ValueError, match='severity must be an integer in 1..5'):
            Corrupt('fog', severity)
    with pytest.raises(ValueError, match='seed must be a non-negative integer'):
        Corrupt('fog', 1, seed=-1)
    img = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match='no img_path'):
        Corrupt('fog', 1)(dict(img=img))
    with pytest.raises(ValueError, match=r'Corrupt\(fog, 1\) on a.jpg: .*must be uint8'):
        Corrupt('fog', 1)(dict(img=img.astype(np.float32), img_path='a.jpg'))
    with pytest.raises(ValueError, match=r'on a.jpg: image of shape \(40, 40\) is grey'):
        Corrupt('fog', 1)(dict(img=img[..., 0], img_path='a.jpg'))
    # seed=None: no path needed, fresh randomness
    out = Corrupt('gaussian_noise', 1, seed=None)(dict(img=img + 100))
    assert out['img'].shape == img.shape and out['corruption'] == 'gaussian_noise'
