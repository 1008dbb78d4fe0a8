"""Shared fixtures of the integration tests: demo data (real COCO / ADE20K formats) in a
session temp folder, config loading with the data roots pointed there, and Runner
helpers (a data batch, one checked training step)."""
import math
import os.path as osp
import warnings

import pytest
import torch

# the demo's own overrides: the tests build exactly what tools/demo.py runs
from dcls_mm.datasets.demo import ade20k_demo_cfg_options as seg_data_options  # noqa: F401
from dcls_mm.datasets.demo import coco_demo_cfg_options as det_data_options  # noqa: F401
from tests._helpers import ROOT

DEMO_DET = osp.join(
    ROOT, 'configs/demo/cascade-mask-rcnn_convnext-dcls-atto_fpn_4conv1fc-giou_ms-crop-1e_demo-coco.py')
DEMO_SEG = osp.join(ROOT, 'configs/demo/upernet_convnext-dcls-atto_demo-ade20k-64x64.py')
DET_DIR = osp.join(ROOT, 'configs/cascade_mask_rcnn')
SEG_DIR = osp.join(ROOT, 'configs/upernet')


@pytest.fixture(scope='session')
def coco_demo(tmp_path_factory):
    from dcls_mm.datasets import make_coco_demo
    return make_coco_demo(str(tmp_path_factory.mktemp('coco')), num_images=4,
                          num_val_images=2, image_size=(96, 64))


@pytest.fixture(scope='session')
def ade_demo(tmp_path_factory):
    from dcls_mm.datasets import make_ade20k_demo
    return make_ade20k_demo(str(tmp_path_factory.mktemp('ade')), num_images=4,
                            num_val_images=2, image_size=(64, 64))


def load_cfg(path, options=None, work_dir=None):
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    if options:
        cfg.merge_from_dict(options)
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    cfg.launcher = 'none'
    cfg.log_level = 'WARNING'
    return cfg


def build_runner(cfg):
    """An mmengine Runner (model built, SyncBN reverted on a single CPU process) whose
    optim_wrapper is built too."""
    import dcls_mm.engine  # noqa: F401
    import dcls_mm.models  # noqa: F401
    from mmengine.runner import Runner
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        runner = Runner.from_cfg(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(cfg.optim_wrapper)
    return runner


def atto_backbone_options(prefix='model.backbone'):
    return {f'{prefix}.arch': 'atto', f'{prefix}.dilated_kernel_size': 9,
            f'{prefix}.kernel_count': None, f'{prefix}.init_cfg': None}


def group_of(optim_wrapper, name):
    for group in optim_wrapper.optimizer.param_groups:
        if name in group['param_names']:
            return group
    raise KeyError(name)


def data_batch(runner, split='train'):
    """The first batch of the runner's ``<split>_dataloader``."""
    loader = runner.build_dataloader(getattr(runner.cfg, f'{split}_dataloader'))
    return next(iter(loader))


def train_step_changes_params(runner, names, expected_losses=()):
    """One ``train_step`` on a training batch: every logged value is finite, the logged
    losses include ``expected_losses`` and each parameter in ``names`` changed.
    Returns the log vars."""
    model = runner.model
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    batch = data_batch(runner)
    model.train()
    log_vars = model.train_step(batch, runner.optim_wrapper)
    assert all(math.isfinite(float(v)) for v in log_vars.values()), log_vars
    assert set(expected_losses) <= set(log_vars), log_vars
    for n in names:
        assert not torch.equal(before[n], params[n].detach()), f'{n} did not change'
    return log_vars
