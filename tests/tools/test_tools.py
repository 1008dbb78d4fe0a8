"""tools/train.py, tools/test.py, the launchers, demo.py's fast steps, and resuming a
full mmengine training checkpoint under torch's weights_only default."""
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmseg', reason='tools tests need mmdet/mmseg (tools/env/setup.sh)')

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools')
DEMO_SEG = osp.join(ROOT, 'configs/demo/upernet_convnext-dcls-atto_demo-ade20k-64x64.py')
DEMO_DET = osp.join(ROOT, 'configs/demo/cascade-mask-rcnn_convnext-dcls-atto_fpn_demo-coco.py')


@pytest.fixture(scope='module')
def tools():
    sys.path.insert(0, TOOLS)
    import test as test_tool
    import train as train_tool
    yield train_tool, test_tool
    sys.path.remove(TOOLS)


def _options(data_root, max_iters):
    return ['--cfg-options'] + [f'{s}_dataloader.dataset.data_root={data_root}'
                                for s in ('train', 'val', 'test')] + [
        f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters}',
        'default_hooks.checkpoint.interval=1', 'param_scheduler.0.end=1',
        'param_scheduler.1.begin=1', 'param_scheduler.1.end=4', 'log_level=WARNING']


class Evil:  # pickled by reference: an untrusted global in a "checkpoint"
    pass


def test_train_resume_test_cli(tools, tmp_path):
    from dcls_mm.datasets import make_ade20k_demo
    train_tool, test_tool = tools
    data = make_ade20k_demo(str(tmp_path / 'ade'), num_images=2, num_val_images=1,
                            image_size=(64, 64))
    work = str(tmp_path / 'work')
    runner = train_tool.main([DEMO_SEG, '--work-dir', work] + _options(data['data_root'], 1))
    ckpt = osp.join(work, 'iter_1.pth')
    assert osp.isfile(ckpt) and runner.iter == 1
    # torch >= 2.6 refuses mmengine's own training checkpoint by default ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    # ... the tools read it through the checked loader: resume continues at iter 1
    runner = train_tool.main([DEMO_SEG, '--work-dir', work, '--resume'] +
                             _options(data['data_root'], 2))
    assert runner.iter == 2 and osp.isfile(osp.join(work, 'iter_2.pth'))
    metrics = test_tool.main([DEMO_SEG, osp.join(work, 'iter_2.pth'), '--work-dir', work] +
                             _options(data['data_root'], 2))
    assert 'mIoU' in metrics

    from mmengine.runner.checkpoint import CheckpointLoader
    evil = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'x': Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
        CheckpointLoader.load_checkpoint(evil)


def test_amp_falls_back_to_fp32_without_gpu(tools):
    from mmengine.config import Config
    train_tool, _ = tools
    cfg = Config(dict(optim_wrapper=dict(type='AmpOptimWrapper', loss_scale='dynamic',
                                         optimizer=dict(type='AdamW', lr=1e-4))))
    train_tool.fall_back_to_fp32_on_cpu(cfg)
    expected = 'AmpOptimWrapper' if torch.cuda.is_available() else 'OptimWrapper'
    assert cfg.optim_wrapper.type == expected
    if not torch.cuda.is_available():
        assert 'loss_scale' not in cfg.optim_wrapper


def test_configs_resolve_dcls_mm_scope_without_importing_it():
    """What `mim train mmdet CONFIG` relies on: mmdet's own train.py never imports dcls_mm;
    the config's custom_imports and the 'dcls_mm.' registry scope are enough. Run in a
    fresh interpreter, custom imports off, so only the registry scope can resolve it."""
    code = (
        'import sys\n'
        'from mmengine.config import Config\n'
        'from mmengine.registry import init_default_scope\n'
        f'cfg = Config.fromfile({DEMO_DET!r}, import_custom_modules=False)\n'
        "assert 'dcls_mm' not in sys.modules\n"
        "init_default_scope('mmdet')\n"
        'from mmdet.registry import MODELS\n'
        'model = MODELS.build(cfg.model)\n'
        "print(type(model.backbone).__module__)\n")
    out = subprocess.run([sys.executable, '-W', 'ignore', '-c', code], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith('dcls_mm.models.backbones.convnext_dcls')


@pytest.mark.parametrize('script,nargs', [('dist_train.sh', 2), ('slurm_train.sh', 4)])
def test_launcher_scripts(script, nargs):
    path = osp.join(TOOLS, script)
    assert os.access(path, os.X_OK)
    assert subprocess.run(['bash', '-n', path]).returncode == 0
    out = subprocess.run(['bash', path], capture_output=True, text=True)
    assert out.returncode == 2 and 'usage' in out.stderr


def test_demo_layer_and_backbone_steps(tools):
    sys.path.insert(0, TOOLS)
    import demo
    layer = demo.demo_layer()
    assert layer['kernel'] == [8, 1, 9, 9] and layer['position_grad_norm'] > 0
    backbone = demo.demo_backbone()
    assert backbone['positions_with_grad'] == backbone['position_tensors'] == 4
    assert backbone['params'] <= backbone['dense_params']
