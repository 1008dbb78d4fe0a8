"""Folder layouts: discovery, canonical labels, and every layout error message."""
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from dcls_mm.evaluation.folders import (DataLayoutError, class_subset, imagenet_wnids,
                                        limit_items, resolve_benchmark_root,
                                        scan_class_folders, scan_corruption_root)


def _img(path):
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format='JPEG')


def test_class_folders_use_imagenet_1k_indices(tmp_path):
    # a folder holding only 2 of the 1000 classes still maps to ImageNet-1k indices
    _img(str(tmp_path / 'n01443537' / 'b.JPEG'))
    _img(str(tmp_path / 'n01443537' / 'a.JPEG'))
    _img(str(tmp_path / 'n15075141' / 'c.jpg'))
    (tmp_path / 'n15075141' / 'notes.txt').write_text('ignored')
    items = scan_class_folders(str(tmp_path), 'imagenet')
    assert [(osp.basename(p), label) for p, label in items] == [
        ('a.JPEG', 1), ('b.JPEG', 1), ('c.jpg', 999)]


@pytest.mark.parametrize('make,message', [
    (lambda r: None, 'does not exist'),
    (lambda r: _img(osp.join(r, 'flat.JPEG')), 'holds images directly'),
    (lambda r: _img(osp.join(r, 'cats', 'a.JPEG')), 'unexpected folder'),
    (lambda r: _img(osp.join(r, 'n99999999', 'a.JPEG')), 'n99999999 is not an ImageNet-1k class'),
    (lambda r: os.makedirs(osp.join(r, 'n01440764')), 'no images found'),
])
def test_class_folder_errors(tmp_path, make, message):
    root = str(tmp_path / 'val')
    make(root)
    with pytest.raises(DataLayoutError, match=message) as info:
        scan_class_folders(root, 'imagenet')
    assert '\n' not in str(info.value) and str(info.value).startswith('imagenet: ')


def test_imagenet_a_rejects_class_outside_its_200(tmp_path):
    wnids_a, _ = class_subset('imagenet-a')
    outside = next(w for w in imagenet_wnids() if w not in set(wnids_a))
    _img(str(tmp_path / wnids_a[0] / 'a.JPEG'))
    assert len(scan_class_folders(str(tmp_path), 'imagenet-a', wnids_a)) == 1
    _img(str(tmp_path / outside / 'a.JPEG'))
    with pytest.raises(DataLayoutError, match=f'{outside} is not one of the 200 classes of '
                       'imagenet-a'):
        scan_class_folders(str(tmp_path), 'imagenet-a', wnids_a)


def test_imagenet_c_with_and_without_category_folders(tmp_path):
    for root, prefix in ((tmp_path / 'plain', ''), (tmp_path / 'cat', 'noise')):
        _img(str(root / prefix / 'gaussian_noise' / '1' / 'n01440764' / 'a.JPEG'))
        _img(str(root / prefix / 'gaussian_noise' / '5' / 'n01440764' / 'a.JPEG'))
    _img(str(tmp_path / 'cat' / 'extra' / 'spatter' / '2' / 'n01440764' / 'a.JPEG'))
    _img(str(tmp_path / 'cat' / 'blur' / 'defocus_blur' / '3' / 'n01440764' / 'a.JPEG'))
    plain = scan_corruption_root(str(tmp_path / 'plain'), 'imagenet-c')
    assert {c: list(s) for c, s in plain.items()} == {'gaussian_noise': [1, 5]}
    cat = scan_corruption_root(str(tmp_path / 'cat'), 'imagenet-c')
    # canonical order: benchmark corruptions, then the extra ones
    assert list(cat) == ['gaussian_noise', 'defocus_blur', 'spatter']
    assert cat['spatter'][2].endswith(osp.join('extra', 'spatter', '2'))


def test_c_bar_parameter_named_severities(tmp_path):
    for name in ('2.35', '3.20', '4.90', '6.60', '9.15'):
        _img(str(tmp_path / 'caustic_refraction' / name / 'n01440764' / 'a.JPEG'))
    for name in ('1', '2', '3', '4', '5'):  # the preprocessed download: 1..5
        _img(str(tmp_path / 'sparkles' / name / 'n01440764' / 'a.JPEG'))
    found = scan_corruption_root(str(tmp_path), 'imagenet-c-bar')
    caustic = {s: osp.basename(p) for s, p in found['caustic_refraction'].items()}
    assert caustic == {1: '2.35', 2: '3.20', 3: '4.90', 4: '6.60', 5: '9.15'}
    # "5" is severity 5 here, not the parameter 5 (= severity 4 of sparkles)
    assert {s: osp.basename(p) for s, p in found['sparkles'].items()} == {
        1: '1', 2: '2', 3: '3', 4: '4', 5: '5'}


@pytest.mark.parametrize('bench,path,message', [
    ('imagenet-c', 'gaussian_noise/1/n01440764/a.JPEG', None),
    ('imagenet-c', 'not_a_corruption/1/n01440764/a.JPEG', 'unknown corruption folder'),
    ('imagenet-c', 'noise/fog_typo/1/n01440764/a.JPEG', 'is not a corruption of the '
     'category noise'),
    ('imagenet-c', 'blur/gaussian_noise/1/n01440764/a.JPEG', 'is not a corruption of the '
     'category blur'),
    ('imagenet-c', ('fog/1/n01440764/a.JPEG', 'weather/fog/1/n01440764/a.JPEG'),
     'corruption fog found twice'),
    ('imagenet-c-bar', ('sparkles/1/n01440764/a.JPEG', 'sparkles/1.00/n01440764/a.JPEG'),
     'sparkles: severity 1 found twice'),
    ('imagenet-c', 'fog/n01440764/a.JPEG', 'severity folders missing'),
    ('imagenet-c', 'fog/a.JPEG', 'severity folders missing'),
    ('imagenet-c', 'fog/7/n01440764/a.JPEG', 'unexpected severity folder'),
    ('imagenet-c', 'n01440764/a.JPEG', 'holds class folders'),
    ('imagenet-c', 'a.JPEG', 'holds images directly'),
    ('imagenet-c-bar', 'sparkles/4.00/n01440764/a.JPEG', 'is not one of the parameter values'),
    ('imagenet-c-bar', 'gaussian_noise/1/n01440764/a.JPEG', 'unknown corruption folder'),
])
def test_corruption_layout_errors(tmp_path, bench, path, message):
    for one in (path,) if isinstance(path, str) else path:
        _img(str(tmp_path / one))
    if message is None:
        assert scan_corruption_root(str(tmp_path), bench)
        return
    with pytest.raises(DataLayoutError, match=message) as info:
        scan_corruption_root(str(tmp_path), bench)
    assert '\n' not in str(info.value) and str(info.value).startswith(bench)


def test_missing_benchmark_folder_and_aliases(tmp_path):
    os.makedirs(tmp_path / 'sketch')
    assert resolve_benchmark_root('imagenet-sketch', str(tmp_path), {}) == str(tmp_path / 'sketch')
    with pytest.raises(DataLayoutError, match=r'imagenet-c: folder .*imagenet-c does not '
                       r'exist \(pass --data imagenet-c=PATH'):
        resolve_benchmark_root('imagenet-c', str(tmp_path), {})
    with pytest.raises(DataLayoutError, match='imagenet-a: folder /nowhere does not exist'):
        resolve_benchmark_root('imagenet-a', str(tmp_path), {'imagenet-a': '/nowhere'})
    with pytest.raises(DataLayoutError, match='pass --data-root'):
        resolve_benchmark_root('imagenet', None, {})


def test_limit_spreads_over_classes():
    items = [(f'{c}/{i}', c) for c in range(10) for i in range(10)]
    picked = limit_items(items, 10)
    assert [label for _, label in picked] == list(range(10))
    assert limit_items(items, None) == items and limit_items(items, 1000) == items
