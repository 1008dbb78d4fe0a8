"""Issue 15 item 6 (datasets, backbone): an empty COCO / ADE20K dataset and segmentation
labels of the wrong size give one error line naming the file, before training; a
backbone above its dense parameter count warns."""
import json
import os
import os.path as osp
import warnings

import pytest
from PIL import Image

from dcls_mm.datasets import make_ade20k_demo, make_coco_demo
from dcls_mm.datasets.checks import check_coco, check_datasets, check_segmentation_folders
from dcls_mm.models import ConvNeXtDCLS
from tests._helpers import load_tool
from tests.tools.test_tools import DEMO_DET, DEMO_SEG


def _train_tool():
    return load_tool('tools/train.py')


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return make_coco_demo(str(tmp_path_factory.mktemp('coco')), num_images=2, num_val_images=1,
                          image_size=(64, 48))


@pytest.fixture
def ade(tmp_path):
    return make_ade20k_demo(str(tmp_path / 'ade'), num_images=3, num_val_images=1,
                            image_size=(40, 32))


def _det_cfg(data_root):
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO_DET)
    root = data_root.rstrip('/') + '/'
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = root
    return cfg


def test_valid_demo_datasets_pass(coco, ade):
    assert check_coco(osp.join(coco['data_root'], coco['train_ann']), True) == 2
    root = ade['data_root']
    assert check_segmentation_folders(osp.join(root, ade['train_img']),
                                      osp.join(root, ade['train_seg'])) == 3
    check_datasets(_det_cfg(coco['data_root']))


def test_empty_coco_dataset_names_the_annotation_file(coco, tmp_path):
    ann = osp.join(coco['data_root'], coco['train_ann'])
    data = json.load(open(ann))
    empty = str(tmp_path / 'instances_empty.json')
    json.dump(dict(data, images=[], annotations=[]), open(empty, 'w'))
    with pytest.raises(ValueError, match=r'^empty COCO dataset: .*instances_empty.json lists no '
                       r'images$'):
        check_coco(empty)
    no_ann = str(tmp_path / 'instances_noann.json')
    json.dump(dict(data, annotations=[]), open(no_ann, 'w'))
    check_coco(no_ann)  # allowed unless images without annotations are filtered out
    with pytest.raises(ValueError, match='instances_noann.json has no annotations'):
        check_coco(no_ann, filter_empty_gt=True)
    # through tools/train.py: the error comes before any model or dataset is built
    cfg_options = [f'train_dataloader.dataset.data_root={coco["data_root"]}/',
                   f'train_dataloader.dataset.ann_file={empty}', 'val_dataloader=None',
                   'val_cfg=None', 'val_evaluator=None']
    with pytest.raises(ValueError, match=r'^train_dataloader: empty COCO dataset: '):
        _train_tool().main([DEMO_DET, '--work-dir', str(tmp_path / 'w'), '--cfg-options']
                           + cfg_options)


def test_empty_ade20k_dataset_names_the_folder(ade):
    root = ade['data_root']
    img_dir = osp.join(root, ade['val_img'])
    for name in os.listdir(img_dir):
        os.remove(osp.join(img_dir, name))
    with pytest.raises(ValueError, match=r'^empty segmentation dataset: no \*.jpg images in '
                       + img_dir + '$'):
        check_segmentation_folders(img_dir, osp.join(root, ade['val_seg']))


def test_segmentation_label_of_the_wrong_size_names_the_file(ade, tmp_path):
    root = ade['data_root']
    seg_dir = osp.join(root, ade['train_seg'])
    name = sorted(os.listdir(seg_dir))[1]
    label = osp.join(seg_dir, name)
    Image.open(label).resize((20, 32), Image.NEAREST).save(label)
    with pytest.raises(ValueError, match=rf'^segmentation label {label} is 20x32 \(WxH\) but '
                       r'its image .*\.jpg is 40x32$'):
        check_segmentation_folders(osp.join(root, ade['train_img']), seg_dir)
    # the demo segmentation config through tools/train.py: refused before training
    with pytest.raises(ValueError, match=rf'^train_dataloader: segmentation label {label} '):
        _train_tool().main([DEMO_SEG, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                            f'train_dataloader.dataset.data_root={root}',
                            f'val_dataloader.dataset.data_root={root}'])
    os.remove(label)
    with pytest.raises(ValueError, match=rf'^segmentation label {label} \(for image .*\) does '
                       'not exist$'):
        check_segmentation_folders(osp.join(root, ade['train_img']), seg_dir)


def test_backbone_above_dense_parameter_count_warns():
    arch = dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # at or below: silent
        ConvNeXtDCLS(arch, dilated_kernel_size=5, kernel_count=4)
    # hand count: per stage dense 8*5*5 = 200; DCLS 8*K weights + 2*8*K shared positions
    # = 24K > 200 for K = 9 (216)
    with pytest.warns(UserWarning, match=r'kernel_count=9 gives the DCLS depthwise convs 864 '
                      r'parameters, more than dense 5x5 kernels \(800\)'):
        ConvNeXtDCLS(arch, dilated_kernel_size=5, kernel_count=9)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ConvNeXtDCLS(arch, dilated_kernel_size=5, kernel_count=8)  # 768 <= 800
