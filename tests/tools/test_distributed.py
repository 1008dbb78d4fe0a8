"""Multi-process training and testing on a CPU (torchrun + gloo): tools/dist_train.sh and
tools/dist_test.sh start, and 2 processes evaluate exactly what 1 process does."""
import glob
import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys

import pytest
import torch

from tests._helpers import ROOT, load_tool

from ..integration.conftest import DEMO_DET, coco_demo  # noqa: F401  (fixture)

TOOLS = osp.join(ROOT, 'tools')


def test_revert_sync_bn_cfg():
    from mmengine.config import Config

    from dcls_mm.engine.runner_utils import revert_sync_bn_cfg, setup_distributed
    model = dict(type='M', norm_cfg=dict(type='SyncBN', requires_grad=True),
                 heads=[dict(norm_cfg=dict(type='SyncBN')), dict(norm_cfg=dict(type='GN')),
                        dict(norm_cfg=dict(type='MMSyncBN'))],
                 neck=dict(block=dict(norm=dict(type='BN'))))
    assert revert_sync_bn_cfg(model) == 3
    assert model['norm_cfg'] == dict(type='BN', requires_grad=True)
    assert [h['norm_cfg']['type'] for h in model['heads']] == ['BN', 'GN', 'BN']
    assert revert_sync_bn_cfg(model) == 0
    # single process: the config is left alone
    cfg = Config(dict(launcher='none', model=dict(norm_cfg=dict(type='SyncBN'))))
    setup_distributed(cfg)
    assert cfg.model.norm_cfg.type == 'SyncBN' and 'model_wrapper_cfg' not in cfg


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_dist(cmd):
    """Run a tools/dist_*.sh command line on the CPU (no GPU visible, a free port)."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'NNODES')}
    env.update(PYTHON=sys.executable, MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES='')
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _predictions(path):
    with open(path, 'rb') as f:
        preds = pickle.load(f)
    return {p['img_id']: p['pred_instances'] for p in preds}


def _assert_same_predictions(a, b):
    """The same detections (label equal, box within 1e-4, score within 1e-5), in any
    order: the processes' convolutions may sum in another order (thread count, measured
    routes), and two detections whose scores differ by ~1e-8 then swap places in the
    score-sorted lists (seen in CI: scores 0.24857534 and 0.24857533)."""
    assert len(a['labels']) == len(b['labels'])
    unmatched = list(range(len(b['labels'])))
    for i in range(len(a['labels'])):
        match = next((j for j in unmatched if a['labels'][i] == b['labels'][j]
                      and (a['bboxes'][i] - b['bboxes'][j]).abs().max() <= 1e-4
                      and abs(float(a['scores'][i] - b['scores'][j])) <= 1e-5), None)
        assert match is not None, (f'detection {i} (label {int(a["labels"][i])}, score '
                                   f'{float(a["scores"][i])}) has no counterpart')
        unmatched.remove(match)


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU (gloo) path')
def test_two_cpu_processes_train_and_evaluate_like_one(coco_demo, tmp_path):
    root = coco_demo['data_root'].rstrip('/') + '/'  # 4 training, 2 validation images
    ann = root + coco_demo['val_ann']
    # the demo config, evaluated by CocoMetric AND dumping its (gathered) predictions
    config = tmp_path / 'dist_demo.py'
    config.write_text(
        f'_base_ = {DEMO_DET!r}\n'
        f'val_evaluator = [dict(type="CocoMetric", ann_file={ann!r}, metric=["bbox", "segm"]),'
        f' dict(type="DumpDetResults", out_file_path={str(tmp_path / "val2.pkl")!r})]\n')
    options = ['--cfg-options', f'train_dataloader.dataset.data_root={root}',
               f'val_dataloader.dataset.data_root={root}',
               f'test_dataloader.dataset.data_root={root}', f'test_evaluator.ann_file={ann}',
               'train_dataloader.batch_size=1', 'log_level=WARNING']
    work = str(tmp_path / 'work')
    # 2 processes x 1 image x 2 iterations (4 training images), then validation
    run_dist(['bash', osp.join(TOOLS, 'dist_train.sh'), str(config), '2', '--work-dir', work] +
         options)
    ckpt = osp.join(work, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    state = torch.load(ckpt, map_location='cpu', weights_only=False)
    assert state['meta']['iter'] == 2  # each of the 2 processes took 2 of the 4 images
    scalars = [json.loads(line) for path in glob.glob(osp.join(work, '*', 'vis_data',
                                                               'scalars.json'))
               for line in open(path)]
    val2 = next(s for s in scalars if 'coco/bbox_mAP' in s)

    # the same checkpoint, one process
    test_tool = load_tool('tools/test.py')
    one = test_tool.main([DEMO_DET, ckpt, '--work-dir', str(tmp_path / 'test1'), '--out',
                          str(tmp_path / 'test1.pkl')] + options)
    for key, value in one.items():
        assert val2[key] == pytest.approx(value, abs=1e-12), key
    # ... and the predictions themselves, image by image (both shards gathered)
    p1, p2 = _predictions(tmp_path / 'test1.pkl'), _predictions(tmp_path / 'val2.pkl')
    assert sorted(p1) == sorted(p2) == [0, 1]
    assert sum(len(p['scores']) for p in p1.values()) > 0  # something to compare
    for img_id in p1:
        _assert_same_predictions(p1[img_id], p2[img_id])

    # tools/dist_test.sh: 2 test processes give the same predictions again
    run_dist(['bash', osp.join(TOOLS, 'dist_test.sh'), DEMO_DET, ckpt, '2', '--work-dir',
          str(tmp_path / 'test2'), '--out', str(tmp_path / 'test2.pkl')] + options)
    p3 = _predictions(tmp_path / 'test2.pkl')
    assert sorted(p3) == [0, 1]
    for img_id in p1:
        _assert_same_predictions(p1[img_id], p3[img_id])


def test_dist_test_command_line(tmp_path):
    """tools/dist_test.sh and tools/dist_run.sh: usage, and the torchrun command line
    (fake python)."""
    script = osp.join(TOOLS, 'dist_test.sh')
    for name, args in (('dist_test.sh', ['CFG.py', 'CKPT']), ('dist_run.sh', ['2'])):
        assert os.access(osp.join(TOOLS, name), os.X_OK)
        out = subprocess.run(['bash', osp.join(TOOLS, name)] + args, capture_output=True,
                             text=True)
        assert out.returncode == 2 and 'usage' in out.stderr
    shim = tmp_path / 'python'
    shim.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SHIM_LOG"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PYTHON=str(shim), SHIM_LOG=str(tmp_path / 'argv'),
               MASTER_PORT='1234')
    subprocess.run(['bash', script, 'CFG.py', 'C.pth', '3', '--out', 'p.pkl'], env=env,
                   check=True)
    assert (tmp_path / 'argv').read_text().split('\n')[:-1] == [
        '-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
        '--master_addr=127.0.0.1', '--nproc_per_node=3', '--master_port=1234',
        osp.join(TOOLS, 'test.py'), 'CFG.py', 'C.pth', '--launcher', 'pytorch', '--out',
        'p.pkl']
