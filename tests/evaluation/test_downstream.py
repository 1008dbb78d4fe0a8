"""tools/robustness/test_downstream.py on the generated COCO / ADE20K demo data: P, mPC
and rPC against a recomputation from the per-set metrics, resuming, pre-generated
corrupted images equal to on-the-fly corruption, and the one-line errors."""
import csv
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch

from tests._helpers import ROOT, load_tool

from ..integration.conftest import (DEMO_DET, DEMO_SEG, ade_demo, coco_demo,  # noqa: F401
                                   det_data_options, seg_data_options)
from ..tools.test_distributed import run_dist

TOOL = osp.join(ROOT, 'tools/robustness/test_downstream.py')
MAKE_CORRUPTED = osp.join(ROOT, 'tools/robustness/make_corrupted.py')


@pytest.fixture(scope='module')
def tool():
    return load_tool('tools/robustness/test_downstream.py')


def _random_checkpoint(config, path, seed=0):
    """The randomly initialised model of ``config`` saved as ``{'state_dict': ...}``."""
    import dcls_mm.models  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config)
    init_default_scope(cfg.default_scope)
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope='module')
def det_ckpt(tmp_path_factory):
    return _random_checkpoint(DEMO_DET, tmp_path_factory.mktemp('det') / 'det.pth')


@pytest.fixture(scope='module')
def seg_ckpt(tmp_path_factory):
    return _random_checkpoint(DEMO_SEG, tmp_path_factory.mktemp('seg') / 'seg.pth')


def det_options(data):
    # + class-agnostic recall: the random detector's AP is mostly 0, its AR is not
    return ['--cfg-options'] + [f'{k}={v}' for k, v in det_data_options(data).items()] + [
        'test_evaluator.metric=[bbox,segm,proposal]', 'log_level=WARNING']


def seg_options(data):
    # test at the stored 64x64 (one sliding-window crop) instead of upscaling to 128x128
    return ['--cfg-options'] + [f'{k}={v}' for k, v in seg_data_options(data).items()] + [
        'test_dataloader.dataset.pipeline.1.scale=(64,64)', 'log_level=WARNING']


def check_summary(results, corruptions, severities):
    """P / mPC / rPC recomputed from the per-set table with plain loops."""
    assert results['covered'] == {c: severities for c in corruptions}
    assert list(results['per_set']) == corruptions
    for metric, row in results['metrics'].items():
        p = results['clean'][metric]
        total = 0.
        for c in corruptions:
            total += sum(results['per_set'][c][str(s)][metric] for s in severities) / len(
                severities)
        mpc = total / len(corruptions)
        assert row['P'] == p
        assert row['mPC'] == pytest.approx(mpc, rel=1e-12, abs=1e-12)
        if p:
            assert row['rPC'] == pytest.approx(mpc / p, rel=1e-12)
        else:
            assert row['rPC'] is None


def check_files(out, results, corruptions, severities):
    with open(osp.join(out, 'results.json')) as f:
        on_disk = json.load(f)
    for key in ('metrics', 'clean', 'per_set', 'covered'):
        assert on_disk[key] == json.loads(json.dumps(results[key]))
    with open(osp.join(out, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['corruption'], int(r['severity'])) for r in rows] == [('clean', 0)] + [
        (c, s) for c in corruptions for s in severities]
    for row in rows[1:]:
        for metric in results['metrics']:
            expected = results['per_set'][row['corruption']][row['severity']][metric]
            assert float(row[metric]) == pytest.approx(expected)
    for metric in results['metrics']:
        png = osp.join(out, 'plots', metric.replace('/', '_') + '.png')
        with open(png, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_segmentor_sets_summary_and_resume(tool, ade_demo, seg_ckpt, tmp_path):
    out = str(tmp_path / 'out')
    corruptions, severities = ['gaussian_noise', 'defocus_blur'], [1, 5]
    args = [DEMO_SEG, seg_ckpt, '--corruptions'] + corruptions + [
        '--severities', '0', '1', '5', '--out-dir', out] + seg_options(ade_demo)
    results = tool.main(args)
    assert results['evaluated'] == ['clean', 'gaussian_noise/1', 'gaussian_noise/5',
                                    'defocus_blur/1', 'defocus_blur/5']
    assert {'mIoU', 'aAcc', 'mAcc'} <= set(results['metrics'])
    assert all(s['num_images'] == 2 for s in results['sets'].values())
    check_summary(results, corruptions, severities)
    check_files(out, results, corruptions, severities)
    # the corruption reached the images: heavy noise changes the prediction
    assert results['per_set']['gaussian_noise']['5'] != results['clean']

    # a rerun evaluates nothing new and reproduces the same results
    again = tool.main(args)
    assert again['evaluated'] == []
    assert again['metrics'] == results['metrics'] and again['per_set'] == results['per_set']
    # a subset of the finished sets: mPC over what was asked, nothing evaluated
    subset = tool.main([DEMO_SEG, seg_ckpt, '--corruptions', 'defocus_blur', '--severities',
                        '0', '5', '--out-dir', out] + seg_options(ade_demo))
    assert subset['evaluated'] == [] and subset['covered'] == {'defocus_blur': [5]}
    assert subset['metrics']['mIoU']['mPC'] == results['per_set']['defocus_blur']['5']['mIoU']
    # same folder, another run (seed): refused, naming what changed
    with pytest.raises(SystemExit) as exc:
        tool.main(args + ['--seed', '1'])
    message = str(exc.value)
    assert message.count('\n') == 0 and 'seed' in message and 'different run' in message


def test_detector_pregenerated_equals_on_the_fly(tool, coco_demo, det_ckpt, tmp_path):
    corruptions, severities = ['shot_noise', 'contrast'], [3, 5]
    common = ['--corruptions'] + corruptions + ['--severities', '0', '3', '5']
    fly = tool.main([DEMO_DET, det_ckpt, '--out-dir', str(tmp_path / 'fly')] + common +
                    det_options(coco_demo))
    assert {'coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/AR@100'} <= set(
        fly['metrics'])
    # pycocotools' -1 (no ground truth of that size) is "undefined", never averaged
    assert all(v >= 0 for sets in fly['per_set'].values() for m in sets.values()
               for v in m.values())
    # something non-zero to compare below
    assert any(v > 0 for m in fly['per_set']['shot_noise'].values() for v in m.values())
    check_summary(fly, corruptions, severities)
    check_files(str(tmp_path / 'fly'), fly, corruptions, severities)

    src = osp.join(coco_demo['data_root'], coco_demo['val_img'])
    gen = str(tmp_path / 'coco-c')
    out = subprocess.run([sys.executable, MAKE_CORRUPTED, src, gen, '--corruptions'] +
                         corruptions + ['--severities', '3', '5', '--seed', '0',
                                        '--workers', '1'],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    pre = tool.main([DEMO_DET, det_ckpt, '--out-dir', str(tmp_path / 'pre'),
                     '--corrupted-root', gen] + common + det_options(coco_demo))
    assert pre['clean'] == fly['clean']
    assert pre['per_set'] == fly['per_set']
    assert pre['metrics'] == fly['metrics']


def test_pregenerated_segmentation_set_missing_an_image(tool, ade_demo, seg_ckpt, tmp_path):
    """mmseg lists a folder's images: a pre-generated set missing one (a killed
    make_corrupted run) was scored on the rest without a word."""
    import os
    src = osp.join(ade_demo['data_root'], ade_demo['val_img'])
    gen = str(tmp_path / 'ade-c')
    out = subprocess.run([sys.executable, MAKE_CORRUPTED, src, gen, '--corruptions', 'fog',
                          '--severities', '1', '--seed', '0', '--workers', '1'],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = osp.join(gen, 'fog', '1')
    os.remove(osp.join(folder, sorted(os.listdir(folder))[0]))
    with pytest.raises(SystemExit) as exc:
        tool.main([DEMO_SEG, seg_ckpt, '--out-dir', str(tmp_path / 'out'), '--corruptions',
                   'fog', '--severities', '1', '--corrupted-root', gen] + seg_options(ade_demo))
    assert 'holds 1 images, the clean test set 2' in str(exc.value)


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU (gloo) path')
def test_two_processes_equal_one(tool, ade_demo, seg_ckpt, tmp_path):
    """torchrun, 2 CPU processes: each evaluates one of the 2 images of every set; the
    metrics of the gathered predictions equal the single-process ones."""
    args = [DEMO_SEG, seg_ckpt, '--corruptions', 'gaussian_noise', '--severities', '0', '5']
    one = tool.main(args + ['--out-dir', str(tmp_path / 'one')] + seg_options(ade_demo))
    run_dist(['bash', osp.join(ROOT, 'tools/dist_run.sh'), '2', TOOL] + args + [
        '--out-dir', str(tmp_path / 'two'), '--launcher', 'pytorch'] + seg_options(ade_demo))
    with open(tmp_path / 'two' / 'results.json') as f:
        two = json.load(f)
    assert two['clean'] == one['clean'] and two['per_set'] == one['per_set']
    assert two['metrics'] == json.loads(json.dumps(one['metrics']))
    with open(tmp_path / 'two' / 'records.jsonl') as f:
        records = [json.loads(line) for line in f.read().splitlines()[1:]]
    assert [(r['key'], r['record']['processes'], r['record']['num_images'])
            for r in records] == [('clean', 2, 2), ('gaussian_noise/5', 2, 2)]


def test_one_line_errors(tool, ade_demo, seg_ckpt, det_ckpt, tmp_path):
    out = str(tmp_path / 'out')

    def error(args):
        with pytest.raises(SystemExit) as exc:
            tool.main(args)
        message = str(exc.value)
        assert message.startswith('test_downstream.py: error: ') and '\n' not in message
        return message

    base = [DEMO_SEG, seg_ckpt, '--out-dir', out]
    assert "unknown corruption 'fogg'" in error(base + ['--corruptions', 'fog', 'fogg'])
    assert 'severity 6 is outside 0..5' in error(base + ['--severities', '0', '6'])
    assert 'severity -1 is outside 0..5' in error(base + ['--severities', '-1'])
    assert 'no test_dataloader' in error(base + seg_options(ade_demo) + ['test_dataloader=None'])
    assert 'does not exist' in error([DEMO_SEG, str(tmp_path / 'none.pth'), '--out-dir', out])
    assert 'lacks 2 set folder(s)' in error(
        base + ['--corruptions', 'fog', '--severities', '1', '2', '--corrupted-root',
                str(tmp_path)] + seg_options(ade_demo))
    # a detector's weights for the segmentor: refused before any set is evaluated
    message = error([DEMO_SEG, det_ckpt, '--out-dir', out, '--corruptions', 'fog',
                     '--severities', '0'] + seg_options(ade_demo))
    assert 'does not fit the model' in message and 'missing keys' in message
    # one changed shape is named with both shapes
    state = torch.load(seg_ckpt, weights_only=True)['state_dict']
    key = 'decode_head.conv_seg.weight'
    state[key] = torch.zeros((7,) + tuple(state[key].shape[1:]))
    bad = str(tmp_path / 'bad.pth')
    torch.save({'state_dict': state}, bad)
    message = error([DEMO_SEG, bad, '--out-dir', str(tmp_path / 'out2'), '--corruptions',
                     'fog', '--severities', '0'] + seg_options(ade_demo))
    assert f'1 shape mismatches (e.g. {key} (7,' in message
    assert not osp.exists(osp.join(out, 'results.json'))


def test_summary_against_hand_values():
    from dcls_mm.evaluation.downstream import robustness_summary
    clean = {'mAP': 0.40, 'AP50': 0.60}
    per_set = {
        'fog': {1: {'mAP': 0.30, 'AP50': 0.50}, 3: {'mAP': 0.20, 'AP50': 0.40}},
        'snow': {'2': {'mAP': 0.10}},  # AP50 missing here: not counted as zero
    }
    summary = robustness_summary(clean, per_set)
    # mAP: fog (0.30 + 0.20) / 2 = 0.25, snow 0.10 -> mPC 0.175, rPC 0.4375
    assert summary['mAP']['P'] == 0.40
    assert summary['mAP']['mPC'] == pytest.approx(0.175)
    assert summary['mAP']['rPC'] == pytest.approx(0.4375)
    # AP50: fog only, (0.50 + 0.40) / 2 = 0.45 -> rPC 0.75
    assert summary['AP50']['mPC'] == pytest.approx(0.45)
    assert summary['AP50']['rPC'] == pytest.approx(0.75)
    # no clean run: no P, no rPC (never an infinite ratio); P = 0: rPC undefined
    assert robustness_summary(None, per_set)['mAP'] == dict(P=None, mPC=pytest.approx(0.175),
                                                            rPC=None)
    assert robustness_summary({'mAP': 0.0}, per_set)['mAP']['rPC'] is None
    assert robustness_summary(clean, {})['mAP'] == dict(P=0.40, mPC=None, rPC=None)
    # the 4 extra corruptions stay out of mPC and rPC (they once pulled 30.0 down to 25.8)
    from dcls_mm.datasets.corruptions import corruption_names
    sets = {c: {s: {'mAP': 30.0} for s in range(1, 6)} for c in corruption_names('benchmark')}
    sets.update({c: {s: {'mAP': 10.0} for s in range(1, 6)} for c in corruption_names('extra')})
    assert robustness_summary({'mAP': 40.0}, sets)['mAP'] == dict(
        P=40.0, mPC=pytest.approx(30.0), rPC=pytest.approx(0.75), mPC_extra=pytest.approx(10.0))


def test_pipeline_and_folder_rewrites():
    from dcls_mm.evaluation.downstream import (check_severities, with_corruption,
                                               with_image_folder)
    loader = dict(batch_size=1, dataset=dict(
        type='ConcatDataset', datasets=[
            dict(type='CocoDataset', data_root='d/', data_prefix=dict(img='val2017/'),
                 pipeline=[dict(type='LoadImageFromFile'), dict(type='Resize')]),
            dict(type='ADE20KDataset', data_prefix=dict(img_path='images/validation',
                                                        seg_map_path='annotations/validation'),
                 pipeline=[dict(type='mmseg.LoadImageFromFile'),
                           dict(type='LoadAnnotations')])]))
    out = with_corruption(loader, 'fog', 3, 7)
    corrupt = dict(type='dcls_mm.Corrupt', corruption='fog', severity=3, seed=7)
    assert [t['type'] for t in out['dataset']['datasets'][0]['pipeline']] == [
        'LoadImageFromFile', 'dcls_mm.Corrupt', 'Resize']
    assert out['dataset']['datasets'][1]['pipeline'][1] == corrupt
    assert len(loader['dataset']['datasets'][0]['pipeline']) == 2  # input untouched
    moved = with_image_folder(loader, '/c/fog/3')
    assert moved['dataset']['datasets'][0]['data_prefix'] == dict(img='/c/fog/3/')
    assert moved['dataset']['datasets'][1]['data_prefix'] == dict(
        img_path='/c/fog/3/', seg_map_path='annotations/validation')
    with pytest.raises(ValueError, match='no LoadImageFromFile'):
        with_corruption(dict(dataset=dict(pipeline=[dict(type='Resize')])), 'fog', 1, 0)
    assert check_severities([5, 0, 3, 3]) == [0, 3, 5]


def test_demo_coco_c_step(det_ckpt, tmp_path):
    """tools/demo.py's step 5 on step 3's checkpoint location (here: random weights)."""
    import shutil

    from dcls_mm.datasets import make_coco_demo
    demo = load_tool('tools/demo.py')
    make_coco_demo(str(tmp_path / 'data' / 'coco'), num_images=1, num_val_images=2,
                   image_size=(96, 64))
    (tmp_path / 'det').mkdir()
    shutil.copy(det_ckpt, tmp_path / 'det' / 'epoch_1.pth')
    out = demo.demo_coco_c(str(tmp_path), dict(work_dir=str(tmp_path / 'det')))
    assert list(out['per_set']) == ['gaussian_noise'] and list(
        out['per_set']['gaussian_noise']) == ['3']
    box = out['metrics']['coco/bbox_mAP']
    assert box['P'] == out['clean']['coco/bbox_mAP']
    assert box['mPC'] == out['per_set']['gaussian_noise']['3']['coco/bbox_mAP']
    assert osp.isfile(osp.join(out['out_dir'], 'results.json'))
