# Cascade Mask R-CNN 3x (36 epochs, "ms-crop" augmentation), ConvNeXt-T-dcls backbone.
# Reproduces docs/recipes.md (COCO, ConvNeXt-T-dcls: 51.2 box AP / 44.5 mask AP).
#
# Everything that is not the backbone comes from mmdet 3.3.0's own ConvNeXt-T config
# (4conv1fc heads with SyncBN, GIoU x10 + reg_decoded_bbox, per-stage target stds,
# DETR-style ms-crop pipeline, AdamW 2e-4 / wd 0.05, warm-up 1000 iters from 0.001,
# MultiStepLR [27, 33], 36 epochs, AmpOptimWrapper, batch 2 per GPU). This file only
# swaps the backbone for dcls_mm.ConvNeXtDCLS and the lr-decay constructor for the
# DCLS-aware one (positions: weight decay 0, lr x1 as in the published downstream code).
# tests/integration/test_configs.py checks the merged values against docs/recipes.md.
_base_ = [
    'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',  # noqa
    '../_base_/det_tta.py', '../_base_/convnext_dcls_t.py'
]

# The mmdet base imports mmpretrain (for its ConvNeXt); we need dcls_mm instead. The
# 'dcls_mm.' registry scope would resolve without it; importing keeps `mim train` and
# mmdet's own tools/train.py equivalent to ours. dcls_mm.models.det_tta: the --tta model.
custom_imports = dict(imports=['dcls_mm.models', 'dcls_mm.engine', 'dcls_mm.models.det_tta'],
                      allow_failed_imports=False)

default_hooks = {{_base_.dcls_mm_default_hooks}}
custom_hooks = {{_base_.dcls_mm_custom_hooks}}

# what the backbone's init_cfg reads (the base's checkpoint_file is mmpretrain's URL)
checkpoint_file = 'checkpoints/convnext_dcls_tiny_1k_224_ema.pth'
model = dict(
    backbone={{_base_.convnext_dcls_t_backbone}},
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    constructor='dcls_mm.DCLSLearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6,
                       position_lr_mult=1.0),
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05))

# 8 GPUs x 2 images (batch 16); set auto_scale_lr.enable=True for another total batch.
auto_scale_lr = dict(enable=False, base_batch_size=16)
