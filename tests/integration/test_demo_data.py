"""The demo data generator writes the real formats, consistently, idempotently."""
import json
import os
import os.path as osp

import numpy as np
from PIL import Image


def test_coco_demo_is_consistent(coco_demo):
    from pycocotools.coco import COCO
    root = coco_demo['data_root']
    coco = COCO(osp.join(root, coco_demo['train_ann']))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(coco_demo['classes'])
    assert len(coco.getImgIds()) == 4
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        img = Image.open(osp.join(root, coco_demo['train_img'], info['file_name']))
        assert img.format == 'JPEG' and img.size == (info['width'], info['height'])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert anns
        for ann in anns:
            mask = coco.annToMask(ann)
            assert mask.sum() == ann['area'] > 0
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann['bbox']
            assert x - 1 <= xs.min() and xs.max() <= x + w + 1
            assert y - 1 <= ys.min() and ys.max() <= y + h + 1


def test_ade_demo_format(ade_demo):
    root = ade_demo['data_root']
    imgs = sorted(os.listdir(osp.join(root, ade_demo['train_img'])))
    segs = sorted(os.listdir(osp.join(root, ade_demo['train_seg'])))
    assert [i[:-4] for i in imgs] == [s[:-4] for s in segs] and len(imgs) == 4
    assert imgs[0].startswith('ADE_train_') and imgs[0].endswith('.jpg')
    label = Image.open(osp.join(root, ade_demo['train_seg'], segs[0]))
    assert label.mode == 'L' and label.format == 'PNG'
    values = set(np.unique(np.asarray(label)))
    assert 0 in values and values <= {0, 1, 2, 3, 4} and len(values) > 1


def test_generators_are_idempotent(tmp_path):
    from dcls_mm.datasets import make_ade20k_demo, make_coco_demo
    out = make_coco_demo(str(tmp_path / 'c'), num_images=2, num_val_images=1)
    ann = osp.join(out['data_root'], out['train_ann'])
    stamp = os.stat(ann).st_mtime_ns
    make_coco_demo(str(tmp_path / 'c'), num_images=2, num_val_images=1)
    assert os.stat(ann).st_mtime_ns == stamp  # reused
    make_coco_demo(str(tmp_path / 'c'), num_images=3, num_val_images=1)
    with open(ann) as f:
        assert len(json.load(f)['images']) == 3  # regenerated for new parameters
    assert len(os.listdir(tmp_path / 'c' / 'train2017')) == 3
    out = make_ade20k_demo(str(tmp_path / 'a'), num_images=2, num_val_images=1)
    make_ade20k_demo(str(tmp_path / 'a'), num_images=1, num_val_images=1)
    assert len(os.listdir(tmp_path / 'a' / 'images' / 'training')) == 1


def test_cfg_options_point_the_demo_configs_at_the_data(coco_demo, ade_demo):
    """The overrides the demo and the integration tests use: every path the demo
    configs then name exists (checked by the tools' own pre-flight check)."""
    from mmengine.config import Config

    from dcls_mm.datasets.checks import missing_data
    from dcls_mm.datasets.demo import ade20k_demo_cfg_options, coco_demo_cfg_options

    from .conftest import DEMO_DET, DEMO_SEG
    det = Config.fromfile(DEMO_DET)
    det.merge_from_dict(coco_demo_cfg_options(coco_demo))
    root = coco_demo['data_root'].rstrip('/') + '/'
    assert det.test_dataloader.dataset.data_root == root
    assert det.val_evaluator.ann_file == det.test_evaluator.ann_file == osp.join(
        root, 'annotations/instances_val2017.json')
    assert missing_data(det) == []
    seg = Config.fromfile(DEMO_SEG)
    seg.merge_from_dict(ade20k_demo_cfg_options(ade_demo))
    assert seg.val_dataloader.dataset.data_root == ade_demo['data_root']
    assert missing_data(seg) == []
