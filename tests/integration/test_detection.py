"""Cascade Mask R-CNN built from config FILES: one training step, one inference step,
frozen stages inside the detector, and the real CocoMetric on generated COCO data."""
import math

import numpy as np
import pytest
import torch

from .conftest import (DEMO_DET, DET_DIR, atto_backbone_options, build_runner, data_batch,
                       det_data_options, group_of, load_cfg, train_step_changes_params)

FULL_T = f'{DET_DIR}/cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
SMALL_PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='PackDetInputs')
]


def _check_predictions(runner, num_classes):
    model = runner.model
    model.eval()
    batch = data_batch(runner, 'val')
    with torch.no_grad():
        outputs = model.test_step(batch)
    assert len(outputs) == len(batch['inputs'])
    for sample in outputs:
        pred = sample.pred_instances
        n = len(pred)
        assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,)
        assert pred.labels.shape == (n,)
        h, w = sample.ori_shape
        assert pred.masks.shape == (n, h, w) and pred.masks.dtype == torch.bool
        if n:
            assert int(pred.labels.max()) < num_classes
            assert float(pred.bboxes[:, 2].max()) <= w + 1e-3


def test_demo_config_train_and_inference_step(coco_demo, tmp_path):
    cfg = load_cfg(DEMO_DET, det_data_options(coco_demo), tmp_path)
    runner = build_runner(cfg)
    log_vars = train_step_changes_params(runner, [
        'backbone.stages.3.0.pwconv1.weight', 'backbone.stages.2.0.dwconv.P',
        'backbone.stages.2.0.dwconv.weight', 'neck.fpn_convs.0.conv.weight',
        'roi_head.bbox_head.2.fc_reg.weight', 'roi_head.mask_head.2.conv_logits.weight'])
    assert {'loss_rpn_cls', 's0.loss_bbox', 's2.loss_mask'} <= set(log_vars)
    _check_predictions(runner, num_classes=3)


@pytest.mark.slow  # the recipe's full-size FPN and heads
def test_full_t_config_with_atto_backbone_trains(coco_demo, tmp_path):
    """The full recipe config (256-ch FPN, 1024-d 4conv1fc heads, 80 classes, its
    constructor) with an atto backbone and small images."""
    options = det_data_options(coco_demo) | atto_backbone_options() | {
        'model.neck.in_channels': [40, 80, 160, 320],
        'train_dataloader.dataset.pipeline': SMALL_PIPELINE,
        # the demo's 3 category names (the heads keep the recipe's 80 classes)
        'train_dataloader.dataset.metainfo': dict(classes=coco_demo['classes']),
        'train_dataloader.num_workers': 0, 'train_dataloader.persistent_workers': False,
        'train_dataloader.batch_size': 1,
        'optim_wrapper.type': 'OptimWrapper',  # AmpOptimWrapper needs a GPU
    }
    cfg = load_cfg(FULL_T, options, tmp_path)
    runner = build_runner(cfg)
    train_step_changes_params(runner, ['backbone.stages.3.0.pwconv1.weight',
                                        'roi_head.bbox_head.0.shared_convs.3.conv.weight'])
    group = group_of(runner.optim_wrapper, 'backbone.downsample_layers.0.0.weight')
    assert group['lr'] == pytest.approx(2e-4 * 0.7 ** 7)


def test_frozen_stages_inside_detector(coco_demo, tmp_path):
    cfg = load_cfg(DEMO_DET, det_data_options(coco_demo) | {'model.backbone.frozen_stages': 1},
                   tmp_path)
    runner = build_runner(cfg)
    backbone = runner.model.backbone
    runner.model.train()
    frozen = [backbone.downsample_layers[0], backbone.downsample_layers[1],
              backbone.stages[0], backbone.stages[1]]
    for module in frozen:
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not m.training for m in module.modules())
    assert all(m.training for m in backbone.stages[2].modules())
    frozen_names = {n for n, p in runner.model.named_parameters() if not p.requires_grad}
    assert 'backbone.stages.1.0.dwconv.P' in frozen_names
    assert 'backbone.stages.0.1.pwconv2.weight' in frozen_names
    grouped = {n for g in runner.optim_wrapper.optimizer.param_groups for n in g['param_names']}
    assert not grouped & frozen_names
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters()
              if n in frozen_names}
    train_step_changes_params(runner, ['backbone.stages.2.0.dwconv.P'])
    for n, p in runner.model.named_parameters():
        if n in frozen_names:
            assert p.grad is None and torch.equal(p.detach(), before[n]), n


def test_real_coco_metric_on_demo_data(coco_demo, tmp_path):
    """A validation pass of the demo model through the real CocoMetric, and the metric
    on ground truth turned into predictions (AP 1.0: boxes and masks of the generated
    data agree with each other and with the json)."""
    from mmdet.evaluation import CocoMetric
    from pycocotools.coco import COCO

    cfg = load_cfg(DEMO_DET, det_data_options(coco_demo), tmp_path)
    runner = build_runner(cfg)
    metrics = runner.val()
    assert isinstance(runner.val_evaluator.metrics[0], CocoMetric)
    # CocoMetric's keys for both tasks (AP, AP50, AP75, APs/m/l); a near-untrained model
    # scores ~0 (the ground-truth-as-prediction check below is the one that scores 1)
    expected = {f'coco/{task}_{name}' for task in ('bbox', 'segm')
                for name in ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')}
    assert expected <= set(metrics), sorted(metrics)
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert math.isfinite(metrics[key]) and 0 <= metrics[key] <= 1, (key, metrics[key])

    ann_file = cfg.val_evaluator.ann_file
    coco = COCO(ann_file)
    classes = coco_demo['classes']
    cat_ids = coco.getCatIds(catNms=list(classes))
    metric = CocoMetric(ann_file=ann_file, metric=['bbox', 'segm'])
    metric.dataset_meta = dict(classes=classes)
    samples = []
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        boxes = torch.tensor([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                               a['bbox'][1] + a['bbox'][3]] for a in anns], dtype=torch.float32)
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool))
        samples.append(dict(
            img_id=img_id, ori_shape=(info['height'], info['width']),
            pred_instances=dict(bboxes=boxes, scores=torch.ones(len(anns)), masks=masks,
                                labels=torch.tensor([cat_ids.index(a['category_id'])
                                                     for a in anns]))))
    metric.process({}, samples)
    result = metric.evaluate(len(samples))
    assert result['coco/bbox_mAP'] == pytest.approx(1.0)
    assert result['coco/segm_mAP'] == pytest.approx(1.0)
