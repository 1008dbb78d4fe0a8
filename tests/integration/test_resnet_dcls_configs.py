"""The ResNet-50-dcls configs: mmdet's / mmseg's standard ResNet-50 recipes with the
backbone wrapped by dcls_mm.DCLSConverted (the paper's ResNet-50-dcls), built inside the
real detector / segmentor, with positions at weight decay 0."""
import os.path as osp

import pytest
import torch

from .conftest import DET_DIR, SEG_DIR, load_cfg

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
# each test builds a full-size ResNet-50 detector / segmentor
pytestmark = pytest.mark.slow

DET = osp.join(DET_DIR, 'cascade-mask-rcnn_r50-dcls_fpn_ms-3x_coco.py')
SEG = osp.join(SEG_DIR, 'upernet_r50-dcls_4xb4-160k_ade20k-512x512.py')
# iso-parameters with positions shared per stage: floor(9 n / (n + 2)), n = 3, 4, 6, 3
KERNEL_COUNTS = (5, 6, 6, 5)


def check_wrapper(backbone, inner_type):
    assert backbone.type == 'dcls_mm.DCLSConverted'
    assert backbone.backbone.type == inner_type and backbone.backbone.depth == 50
    assert (backbone.dilated_kernel_size, backbone.kernel_count, backbone.interpolation,
            backbone.init, backbone.select) == (7, 'iso', 'bilinear', 'random', 'layer*.conv2')
    assert backbone.share_positions == [f'layer{i}.*' for i in range(1, 5)]
    assert backbone.init_cfg == dict(type='Pretrained',
                                     checkpoint='checkpoints/resnet50_dcls_in1k.pth')


def check_model(model, base_wd, optim_cfg):
    from mmengine.optim import build_optim_wrapper

    from dcls_mm.ops import dcls_layers
    layers = dcls_layers(model)
    assert [n for n, _ in layers] == [f'backbone.backbone.layer{s + 1}.{b}.conv2'
                                      for s, n in enumerate((3, 4, 6, 3)) for b in range(n)]
    inner = model.backbone.backbone
    for s, count in enumerate(KERNEL_COUNTS):
        convs = [block.conv2 for block in getattr(inner, f'layer{s + 1}')]
        assert {c.kernel_count for c in convs} == {count}
        assert all(c.P is convs[0].P for c in convs)
    positions = {id(m.P) for _, m in layers}
    optimizer = build_optim_wrapper(model, optim_cfg).optimizer
    for group in optimizer.param_groups:
        for p in group['params']:
            assert group['weight_decay'] == (0.0 if id(p) in positions else base_wd)
    # the DCLS lr-decay constructor finds the converted layers in the real model too
    lr_decay = dict(type='OptimWrapper',
                    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
                    constructor='dcls_mm.DCLSLearningRateDecayOptimizerConstructor',
                    paramwise_cfg=dict(decay_rate=0.9, num_layers=6))
    groups = build_optim_wrapper(model, lr_decay).optimizer.param_groups
    trainable = {id(p) for p in positions_of(layers) if p.requires_grad}
    assert {id(p) for g in groups if g['group_name'].endswith('_position')
            for p in g['params']} == trainable
    assert all(g['weight_decay'] == 0.0 for g in groups if g['group_name'].endswith('_position'))
    return inner


def positions_of(layers):
    return list({id(m.P): m.P for _, m in layers}.values())


def test_cascade_mask_rcnn_r50_dcls():
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    cfg = load_cfg(DET)
    check_wrapper(cfg.model.backbone, 'mmdet.ResNet')
    inner = cfg.model.backbone.backbone
    assert (inner.frozen_stages, inner.norm_eval, inner.style) == (1, True, 'pytorch')
    # the rest is mmdet's standard 3x recipe
    assert cfg.model.type == 'CascadeRCNN' and cfg.model.neck.in_channels == [256, 512, 1024, 2048]
    assert dict(cfg.optim_wrapper.optimizer) == dict(type='SGD', lr=0.02, momentum=0.9,
                                                     weight_decay=0.0001)
    assert cfg.train_dataloader.dataset.type == 'RepeatDataset'
    assert cfg.train_dataloader.dataset.times == 3 and cfg.train_cfg.max_epochs == 12
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    inner = check_model(model, 1e-4, cfg.optim_wrapper)
    assert not inner.layer1[0].conv2.P.requires_grad  # frozen_stages=1
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 256, s, s) for s in (16, 8, 4, 2, 1)]


def test_upernet_r50_dcls():
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    cfg = load_cfg(SEG)
    check_wrapper(cfg.model.backbone, 'mmseg.ResNet')
    assert cfg.model.pretrained is None
    assert cfg.model.backbone.backbone.norm_cfg.type == 'SyncBN'
    assert cfg.model.decode_head.type == 'UPerHead'
    assert cfg.model.decode_head.in_channels == [256, 512, 1024, 2048]
    assert dict(cfg.optim_wrapper.optimizer) == dict(type='SGD', lr=0.01, momentum=0.9,
                                                     weight_decay=0.0005)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 4
    init_default_scope('mmseg')
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    check_model(model, 5e-4, cfg.optim_wrapper)
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 256 * 2 ** i, 16 // 2 ** i, 16 // 2 ** i)
                                               for i in range(4)]
