"""compare.py: Table-5 rows and deltas for classifier results, P/mPC/rPC for downstream
results, severity plots, and its error messages."""
import json
import os.path as osp

import pytest

from dcls_mm.evaluation.compare import compare_results
from dcls_mm.evaluation.plots import plot_severity_curves


def _classifier(model, clean, mce, a_top1, gauss):
    return {'model': model, 'benchmarks': {
        'imagenet': {'top1': clean, 'top5': 95.0, 'num_images': 50000},
        'imagenet-c': {'mCE': mce, 'relative_mCE': None, 'CE': {'gaussian_noise': mce},
                       'extra': {'spatter': 40.0},
                       'errors': {'gaussian_noise': {str(s): gauss + s for s in range(1, 6)}}},
        'imagenet-a': {'top1': a_top1, 'num_images': 7500}}}


def _downstream(config, ap, mpc):
    return {'config': config, 'metrics': {'coco/bbox_mAP': {'P': ap, 'mPC': mpc, 'rPC': mpc / ap}},
            'clean': {'coco/bbox_mAP': ap},
            'per_set': {'fog': {'1': {'coco/bbox_mAP': mpc + 0.01}, '2': {'coco/bbox_mAP': mpc - 0.01}}},
            'covered': {'fog': [1, 2]}}


def _write(tmp_path, name, obj):
    path = tmp_path / name / 'results.json'
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(obj))
    return str(path)


def test_classifier_table_and_deltas(tmp_path):
    a = _write(tmp_path, 'a', _classifier('convnext_tiny', 82.1, 53.2, 24.2, 30.0))
    b = _write(tmp_path, 'b', _classifier('convnext_dcls_tiny', 82.5, 51.0, 25.0, 28.0))
    out = compare_results([a, b], str(tmp_path / 'cmp'))
    assert out['header'] == ['model', 'clean top-1', 'C mCE', 'A top-1']  # columns present
    assert out['rows'][0] == ['convnext_tiny', 82.1, 53.2, 24.2]
    assert out['rows'][1] == ['convnext_dcls_tiny', 82.5, 51.0, 25.0]
    assert out['rows'][2][0] == 'delta convnext_dcls_tiny'
    assert out['rows'][2][1:] == pytest.approx([0.4, -2.2, 0.8])
    assert '-2.20' in out['table'] and 'spatter' in out['table']
    assert osp.getsize(tmp_path / 'cmp' / 'imagenet_c.png') > 1000
    with open(tmp_path / 'cmp' / 'compare.csv') as f:
        assert f.readline().strip() == 'model,clean top-1,C mCE,A top-1'


def test_downstream_table(tmp_path):
    a = _write(tmp_path, 'a', _downstream('configs/x/mask-rcnn_convnext-t.py', 0.40, 0.20))
    b = _write(tmp_path, 'b', _downstream('configs/x/mask-rcnn_convnext-dcls-t.py', 0.42, 0.25))
    out = compare_results([a, b], str(tmp_path / 'cmp'))
    assert out['header'] == ['model', 'coco/bbox_mAP P', 'coco/bbox_mAP mPC', 'coco/bbox_mAP rPC']
    assert out['rows'][0] == ['mask-rcnn_convnext-t', 0.40, 0.20, 0.5]
    assert out['rows'][2][1:] == pytest.approx([0.02, 0.05, 0.25 / 0.42 - 0.5])
    assert osp.getsize(tmp_path / 'cmp' / 'coco_bbox_mAP.png') > 1000


def test_same_model_twice_labelled_by_folder(tmp_path):
    a = _write(tmp_path, 'run1', _classifier('m', 80, 50, 20, 30))
    b = _write(tmp_path, 'run2', _classifier('m', 81, 49, 21, 29))
    rows = compare_results([a, b])['rows']
    assert [r[0] for r in rows] == ['m [run1]', 'm [run2]', 'delta m [run2]']


def test_errors(tmp_path):
    a = _write(tmp_path, 'a', _classifier('m', 80, 50, 20, 30))
    d = _write(tmp_path, 'd', _downstream('c.py', 0.4, 0.2))
    with pytest.raises(ValueError, match='cannot compare a classifier results file'):
        compare_results([a, d])
    bad = _write(tmp_path, 'bad', {'hello': 1})
    with pytest.raises(ValueError, match='not a robustness results file'):
        compare_results([bad])
    with pytest.raises(ValueError, match='does not exist'):
        compare_results([str(tmp_path / 'none.json')])


def test_plot_severity_curves(tmp_path):
    path = str(tmp_path / 'p' / 'curves.png')
    plot_severity_curves({'a': {'fog': {1: 10.0, 2: 20.0}, 'snow': {'3': 5.0}},
                          'b': {'snow': {0: 1.0, 3: 4.0}}}, path, 'error (%)', title='t',
                         note='n')
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(ValueError, match='no .* point to draw'):
        plot_severity_curves({'a': {}}, path, 'error')
