"""UperNet built from config FILES: one training step, sliding-window inference, the
real IoUMetric on generated ADE20K-format data."""
import numpy as np
import pytest
import torch

from .conftest import (DEMO_SEG, SEG_DIR, atto_backbone_options, build_runner, data_batch,
                       group_of, load_cfg, seg_data_options, train_step_changes_params)

FULL_T = f'{SEG_DIR}/upernet_convnext-dcls-t_8xb2-amp-160k_ade20k-512x512.py'
SEG_LOSSES = ('decode.loss_ce', 'aux.loss_ce')


def test_demo_config_train_and_slide_inference(ade_demo, tmp_path):
    cfg = load_cfg(DEMO_SEG, seg_data_options(ade_demo), tmp_path)
    assert cfg.model.test_cfg.mode == 'slide'
    runner = build_runner(cfg)
    train_step_changes_params(runner, [
        'backbone.stages.3.1.pwconv2.weight', 'backbone.stages.1.0.dwconv.P',
        'decode_head.fpn_bottleneck.conv.weight', 'auxiliary_head.conv_seg.weight'],
        expected_losses=SEG_LOSSES)
    model = runner.model.eval()
    batch = data_batch(runner, 'val')
    with torch.no_grad():
        outputs = model.test_step(batch)
    assert len(outputs) == 1
    sample = outputs[0]
    h, w = sample.ori_shape
    assert sample.pred_sem_seg.data.shape == (1, h, w)
    assert sample.seg_logits.data.shape == (4, h, w)
    assert int(sample.pred_sem_seg.data.max()) < 4


@pytest.mark.slow  # the recipe's full-size UperNet heads
def test_full_t_config_with_atto_backbone_trains(ade_demo, tmp_path):
    """The full recipe config (UPerHead 512 ch, aux FCN 256 ch, 150 classes, its
    constructor) with an atto backbone and 64 px crops."""
    options = seg_data_options(ade_demo) | atto_backbone_options() | {
        'model.decode_head.in_channels': [40, 80, 160, 320],
        'model.auxiliary_head.in_channels': 160,
        'model.data_preprocessor.size': (64, 64),
        'train_dataloader.dataset.pipeline': [
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='RandomCrop', crop_size=(64, 64)),
            dict(type='PackSegInputs')],
        'train_dataloader.num_workers': 0, 'train_dataloader.persistent_workers': False,
        'optim_wrapper.type': 'OptimWrapper',  # AmpOptimWrapper needs a GPU
    }
    cfg = load_cfg(FULL_T, options, tmp_path)
    cfg.optim_wrapper.pop('loss_scale')
    runner = build_runner(cfg)
    assert runner.model.decode_head.num_classes == 150
    train_step_changes_params(runner, ['backbone.stages.0.0.pwconv1.weight',
                                       'decode_head.bottleneck.conv.weight'],
                              expected_losses=SEG_LOSSES)
    group = group_of(runner.optim_wrapper, 'backbone.stages.3.0.pwconv1.weight')
    assert group['lr'] == pytest.approx(1e-4 * 0.9 ** 3)


def test_real_iou_metric_on_demo_data(ade_demo, tmp_path):
    """A validation pass through the real IoUMetric (4 demo classes selected from the 150
    ADE20K ones), and the metric on ground truth as prediction (mIoU 100)."""
    from mmseg.evaluation import IoUMetric
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData

    cfg = load_cfg(DEMO_SEG, seg_data_options(ade_demo), tmp_path)
    runner = build_runner(cfg)
    metrics = runner.val()
    assert isinstance(runner.val_evaluator.metrics[0], IoUMetric)
    assert 0 <= metrics['mIoU'] <= 100 and 0 <= metrics['aAcc'] <= 100
    dataset = runner.val_dataloader.dataset
    assert dataset.metainfo['classes'] == ('wall', 'building', 'sky', 'floor')

    metric = IoUMetric(iou_metrics=['mIoU'])
    metric.dataset_meta = dataset.metainfo
    samples = []
    for i in range(len(dataset)):
        gt = dataset[i]['data_samples'].gt_sem_seg.data
        assert set(np.unique(gt.numpy())) <= {0, 1, 2, 3, 255}
        sample = SegDataSample(gt_sem_seg=PixelData(data=gt), pred_sem_seg=PixelData(data=gt))
        samples.append(sample.to_dict())
    metric.process({}, samples)
    result = metric.evaluate(len(samples))
    assert result['mIoU'] == pytest.approx(100.0)
