"""The recipe configs: merged values (after mmdet/mmseg base inheritance) are exactly
those of docs/recipes.md, and the full-size T models and optimizer
wrappers build with the right layer-/stage-wise lr decay groups."""
import os.path as osp

import pytest

from .conftest import DET_DIR, SEG_DIR, group_of, load_cfg

WIDTHS = {'t': [96, 192, 384, 768], 's': [96, 192, 384, 768], 'b': [128, 256, 512, 1024]}
ARCH = {'t': 'tiny', 's': 'small', 'b': 'base'}
KERNEL_COUNT = {'t': 34, 's': 40, 'b': 40}
# docs/recipes.md, "COCO": drop_path, layer decay, num_layers
DET_RECIPE = {'t': (0.4, 0.7, 6), 's': (0.6, 0.7, 12), 'b': (0.7, 0.8, 12)}
# docs/recipes.md, "ADE20K": drop_path, num_layers (stage-wise decay 0.9 for all)
SEG_RECIPE = {'t': (0.4, 6), 's': (0.3, 12), 'b': (0.4, 12)}
VARIANTS = [(s, dcls) for s in 'tsb' for dcls in (True, False)]


def det_path(size, dcls):
    name = f'convnext-dcls-{size}' if dcls else f'convnext-{size}'
    return osp.join(DET_DIR, f'cascade-mask-rcnn_{name}_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py')


def seg_path(size, dcls):
    name = f'convnext-dcls-{size}' if dcls else f'convnext-{size}'
    return osp.join(SEG_DIR, f'upernet_{name}_8xb2-amp-160k_ade20k-512x512.py')


def check_backbone(backbone, size, dcls, drop_path):
    assert backbone.type == 'dcls_mm.ConvNeXtDCLS'
    assert backbone.arch == ARCH[size]
    assert backbone.dwconv_type == ('dcls' if dcls else 'dense')
    if dcls:
        assert backbone.dilated_kernel_size == 17
        assert backbone.kernel_count == KERNEL_COUNT[size]
        assert backbone.interpolation == 'bilinear' and backbone.share_positions
    assert backbone.drop_path_rate == drop_path
    assert backbone.layer_scale_init_value == 1.0
    assert tuple(backbone.out_indices) == (0, 1, 2, 3)
    ckpt = backbone.init_cfg.checkpoint
    assert backbone.init_cfg.type == 'Pretrained'
    expected = (f'checkpoints/convnext_dcls_{ARCH[size]}_1k_224_ema.pth' if dcls
                else f'checkpoints/convnext_{ARCH[size]}_1k_224.pth')
    assert ckpt == expected


def check_common(cfg, scope):
    assert cfg.default_scope == scope
    imports = cfg.custom_imports['imports']
    assert not any('mmpretrain' in i for i in imports)
    assert 'dcls_mm.models' in imports and 'dcls_mm.engine' in imports


@pytest.mark.parametrize('size,dcls', VARIANTS)
def test_cascade_mask_rcnn_recipe(size, dcls):
    cfg = load_cfg(det_path(size, dcls))
    drop_path, decay, num_layers = DET_RECIPE[size]
    check_common(cfg, 'mmdet')
    check_backbone(cfg.model.backbone, size, dcls, drop_path)
    assert cfg.model.type == 'CascadeRCNN'
    assert cfg.model.neck.type == 'FPN' and cfg.model.neck.in_channels == WIDTHS[size]
    # optimizer / schedule
    ow = cfg.optim_wrapper
    assert ow.type == 'AmpOptimWrapper'
    assert ow.constructor == 'dcls_mm.DCLSLearningRateDecayOptimizerConstructor'
    assert dict(ow.optimizer) == dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999),
                                      weight_decay=0.05)
    assert dict(ow.paramwise_cfg) == dict(decay_rate=decay, decay_type='layer_wise',
                                          num_layers=num_layers, position_lr_mult=1.0)
    warm, step = cfg.param_scheduler
    assert (warm.type, warm.start_factor, warm.by_epoch, warm.begin, warm.end) == \
        ('LinearLR', 0.001, False, 0, 1000)
    assert (step.type, step.milestones, step.gamma, step.by_epoch, step.end) == \
        ('MultiStepLR', [27, 33], 0.1, True, 36)
    assert cfg.train_cfg.max_epochs == 36
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    # heads: three 4conv1fc cascade stages, SyncBN, GIoU x10, decoded boxes, stds
    stds = [[.1, .1, .2, .2], [.05, .05, .1, .1], [.033, .033, .067, .067]]
    heads = cfg.model.roi_head.bbox_head
    assert len(heads) == 3 and cfg.model.roi_head.num_stages == 3
    for head, std in zip(heads, stds):
        assert head.type == 'ConvFCBBoxHead'
        assert (head.num_shared_convs, head.num_shared_fcs) == (4, 1)
        assert head.norm_cfg.type == 'SyncBN'
        assert head.loss_bbox.type == 'GIoULoss' and head.loss_bbox.loss_weight == 10.0
        assert head.reg_decoded_bbox is True and head.reg_class_agnostic is False
        assert head.bbox_coder.target_stds == std
        assert head.num_classes == 80
    assert cfg.model.roi_head.mask_head.num_classes == 80
    # ms-crop pipeline
    pipeline = cfg.train_dataloader.dataset.pipeline
    types = [t.type for t in pipeline]
    assert types == ['LoadImageFromFile', 'LoadAnnotations', 'RandomFlip', 'RandomChoice',
                     'PackDetInputs']
    assert pipeline[1].with_mask and pipeline[2].prob == 0.5
    ms = [(s, 1333) for s in range(480, 801, 32)]
    single, crop = pipeline[3].transforms
    assert [t.type for t in single] == ['RandomChoiceResize']
    assert [tuple(s) for s in single[0].scales] == ms and single[0].keep_ratio
    assert [t.type for t in crop] == ['RandomChoiceResize', 'RandomCrop', 'RandomChoiceResize']
    assert [tuple(s) for s in crop[0].scales] == [(400, 1333), (500, 1333), (600, 1333)]
    assert crop[1].crop_type == 'absolute_range' and tuple(crop[1].crop_size) == (384, 600)
    assert [tuple(s) for s in crop[2].scales] == ms
    assert cfg.val_evaluator.type == 'CocoMetric'
    assert cfg.val_evaluator.metric == ['bbox', 'segm']


@pytest.mark.parametrize('size,dcls', VARIANTS)
def test_upernet_recipe(size, dcls):
    cfg = load_cfg(seg_path(size, dcls))
    drop_path, num_layers = SEG_RECIPE[size]
    check_common(cfg, 'mmseg')
    check_backbone(cfg.model.backbone, size, dcls, drop_path)
    head, aux = cfg.model.decode_head, cfg.model.auxiliary_head
    assert head.type == 'UPerHead' and head.in_channels == WIDTHS[size]
    assert head.channels == 512 and tuple(head.pool_scales) == (1, 2, 3, 6)
    assert head.num_classes == 150 and head.norm_cfg.type == 'SyncBN'
    assert aux.type == 'FCNHead' and aux.in_index == 2 and aux.in_channels == WIDTHS[size][2]
    assert aux.channels == 256 and aux.loss_decode.loss_weight == 0.4
    assert aux.num_classes == 150 and aux.norm_cfg.type == 'SyncBN'
    assert dict(cfg.model.test_cfg) == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
    assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
    ow = cfg.optim_wrapper
    assert ow.type == 'AmpOptimWrapper' and ow.loss_scale == 'dynamic'
    assert ow.constructor == 'dcls_mm.DCLSLearningRateDecayOptimizerConstructor'
    assert dict(ow.optimizer) == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                                      weight_decay=0.05)
    assert dict(ow.paramwise_cfg) == dict(decay_rate=0.9, decay_type='stage_wise',
                                          num_layers=num_layers, position_lr_mult=1.0)
    warm, poly = cfg.param_scheduler
    assert (warm.type, warm.start_factor, warm.by_epoch, warm.begin, warm.end) == \
        ('LinearLR', 1e-6, False, 0, 1500)
    assert (poly.type, poly.power, poly.eta_min, poly.begin, poly.end, poly.by_epoch) == \
        ('PolyLR', 1.0, 0.0, 1500, 160000, False)
    assert cfg.train_cfg.type == 'IterBasedTrainLoop' and cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2
    pipeline = cfg.train_dataloader.dataset.pipeline
    assert [t.type for t in pipeline] == ['LoadImageFromFile', 'LoadAnnotations', 'RandomResize',
                                          'RandomCrop', 'RandomFlip', 'PhotoMetricDistortion',
                                          'PackSegInputs']
    assert pipeline[1].reduce_zero_label and tuple(pipeline[2].scale) == (2048, 512)
    assert tuple(pipeline[3].crop_size) == (512, 512)
    assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
    # multi-scale test of the recipe: ratios 0.5..1.75 of the test scale (2048, 512),
    # keep_ratio, with flip, used by tools/test.py --tta
    assert cfg.tta_pipeline[1].type == 'TestTimeAug'
    tta = cfg.tta_pipeline[1].transforms
    assert [t.type for t in tta[0]] == ['Resize'] * 6
    assert [tuple(t.scale) for t in tta[0]] == [
        (1024, 256), (1536, 384), (2048, 512), (2560, 640), (3072, 768), (3584, 896)]
    assert all(t.keep_ratio and 'scale_factor' not in t for t in tta[0])
    assert [(t.type, t.prob, t.direction) for t in tta[1]] == [
        ('RandomFlip', 0., 'horizontal'), ('RandomFlip', 1., 'horizontal')]
    assert [t.type for t in tta[2] + tta[3]] == ['LoadAnnotations', 'PackSegInputs']
    assert cfg.tta_model.type == 'SegTTAModel'
    assert cfg.val_evaluator.type == 'IoUMetric'


def _build_full(path):
    """Model + optim_wrapper of a full-size config, without pretrained weights (not in
    the repository) and in fp32 (AmpOptimWrapper needs a GPU)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope

    import dcls_mm.engine  # noqa: F401
    cfg = load_cfg(path, {'model.backbone.init_cfg': None})
    init_default_scope(cfg.default_scope)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    ow_cfg = cfg.optim_wrapper.copy()
    assert ow_cfg.pop('type') == 'AmpOptimWrapper'
    ow_cfg.pop('loss_scale', None)
    return cfg, model, build_optim_wrapper(model, dict(type='OptimWrapper', **ow_cfg))


@pytest.mark.slow  # full-size ConvNeXt-T Cascade Mask R-CNN
def test_full_cascade_mask_rcnn_t_builds_with_layer_wise_groups():
    from dcls_mm.ops import Dcls2d
    cfg, model, ow = _build_full(det_path('t', True))
    dcls = [m for m in model.backbone.modules() if isinstance(m, Dcls2d)]
    assert len(dcls) == 18 and all(m.kernel_count == 34 for m in dcls)
    assert model.backbone.stages[3][2].drop_path.drop_prob == pytest.approx(0.4)
    base = 2e-4
    # layer_wise, decay 0.7, N=6: lr_scale = 0.7 ** (7 - id)
    cases = {
        'backbone.downsample_layers.0.0.weight': (0, 0.05),
        'backbone.stages.0.1.pwconv1.weight': (1, 0.05),
        'backbone.downsample_layers.2.1.weight': (3, 0.05),
        'backbone.stages.2.4.pwconv2.weight': (3 + 4 // 3, 0.05),
        'backbone.stages.2.8.pwconv2.weight': (3 + 8 // 3, 0.05),
        'backbone.stages.3.0.pwconv1.weight': (6, 0.05),
        'backbone.stages.1.0.dwconv.P': (2, 0.0),      # positions: no weight decay
        'backbone.stages.1.0.dwconv.weight': (2, 0.05),
        'backbone.stages.1.2.gamma': (2, 0.0),         # 1-D
        'backbone.norm3.weight': (7, 0.0),
        'neck.lateral_convs.0.conv.weight': (7, 0.05),
        'roi_head.bbox_head.2.fc_cls.bias': (7, 0.0),
    }
    for name, (layer_id, wd) in cases.items():
        group = group_of(ow, name)
        assert group['lr'] == pytest.approx(base * 0.7 ** (7 - layer_id)), name
        assert group['weight_decay'] == wd, name
    names = [n for g in ow.optimizer.param_groups for n in g['param_names']]
    assert len(names) == len(set(names))
    assert len(names) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.slow  # full-size ConvNeXt-T UperNet
def test_full_upernet_t_builds_with_stage_wise_groups():
    cfg, model, ow = _build_full(seg_path('t', True))
    assert model.decode_head.channels == 512 and model.auxiliary_head.channels == 256
    base = 1e-4
    cases = {  # stage_wise, decay 0.9, N=6
        'backbone.downsample_layers.3.1.weight': (0, 0.05),
        'backbone.stages.0.0.pwconv1.weight': (1, 0.05),
        'backbone.stages.2.7.dwconv.P': (3, 0.0),
        'backbone.stages.2.0.dwconv.P': (3, 0.0),
        'backbone.stages.3.2.pwconv2.weight': (4, 0.05),
        'decode_head.bottleneck.conv.weight': (7, 0.05),
        'auxiliary_head.conv_seg.bias': (7, 0.0),
    }
    for name, (layer_id, wd) in cases.items():
        if name == 'backbone.stages.2.7.dwconv.P':  # shared P: listed once, under block 0
            assert not any(name in g['param_names'] for g in ow.optimizer.param_groups)
            continue
        group = group_of(ow, name)
        assert group['lr'] == pytest.approx(base * 0.9 ** (7 - layer_id)), name
        assert group['weight_decay'] == wd, name


@pytest.mark.slow  # full-size ConvNeXt-T backbone
def test_dense_baseline_has_no_dcls_layers():
    from mmengine.registry import MODELS, init_default_scope

    from dcls_mm.ops import Dcls2d
    cfg = load_cfg(det_path('t', False), {'model.backbone.init_cfg': None})
    init_default_scope('mmdet')
    backbone = MODELS.build(cfg.model.backbone)
    assert not any(isinstance(m, Dcls2d) for m in backbone.modules())
    assert backbone.stages[0][0].dwconv.kernel_size == (7, 7)
