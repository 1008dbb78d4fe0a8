# UperNet 160k, ADE20K 512x512, ConvNeXt-T-dcls backbone.
# Reproduces docs/recipes.md (ADE20K, ConvNeXt-T-dcls: 47.1 mIoU single-scale / 47.1 multi-scale).
#
# Everything that is not the backbone comes from mmseg 1.2.2's own ConvNeXt-T config
# (UPerHead 512 ch, pool_scales (1, 2, 3, 6), aux FCNHead on stage 3 with 256 ch and
# loss weight 0.4, SyncBN, AdamW 1e-4 / wd 0.05, linear warm-up 1500 iters from 1e-6 then
# poly (power 1, eta_min 0) to 160k, AmpOptimWrapper, batch 2 per GPU, sliding-window
# test crop 512 stride 341). `tools/test.py --tta` gives the recipe's multi-scale + flip
# test: the `tta_pipeline` below (mmseg's base resizes by scale_factor instead).
# This file only swaps the backbone for dcls_mm.ConvNeXtDCLS and the lr-decay
# constructor for the DCLS-aware one (positions: weight decay 0, lr x1).
# tests/integration/test_configs.py checks the merged values against docs/recipes.md.
_base_ = ['mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py',
          '../_base_/convnext_dcls_t.py']

# The mmseg base imports mmpretrain (for its ConvNeXt); we need dcls_mm instead.
custom_imports = dict(imports=['dcls_mm.models', 'dcls_mm.engine'], allow_failed_imports=False)

default_hooks = {{_base_.dcls_mm_default_hooks}}
custom_hooks = {{_base_.dcls_mm_custom_hooks}}

# what the backbone's init_cfg reads (the base's checkpoint_file is mmpretrain's URL)
checkpoint_file = 'checkpoints/convnext_dcls_tiny_1k_224_ema.pth'
model = dict(
    backbone={{_base_.convnext_dcls_t_backbone}},
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    constructor='dcls_mm.DCLSLearningRateDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6,
                       position_lr_mult=1.0),
    loss_scale='dynamic')

# Multi-scale + flip test of the recipe (`tools/test.py --tta`): the image is resized
# (keep_ratio) to ratios 0.5..1.75 of (2048, 512), each also flipped horizontally.
# mmseg 1.2.2's ade20k base uses Resize(scale_factor=r) of the original image instead;
# the recipe scales the test scale (2048, 512), as mmseg 0.x's MultiScaleFlipAug did.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True)
             for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
