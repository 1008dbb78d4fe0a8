# Cascade Mask R-CNN 3x ms-crop, ConvNeXt-S-dcls (docs/recipes.md: 52.8 box AP / 45.6 mask AP).
# As the T-dcls config, with drop_path 0.6 and layer-wise decay 0.7 over 12 layers.
_base_ = './cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

# Zenodo record 7112021: convnext_dcls_small_1k_224_ema.pth
checkpoint_file = 'checkpoints/convnext_dcls_small_1k_224_ema.pth'

model = dict(
    backbone=dict(
        arch='small',
        kernel_count=40,
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise',
                                        num_layers=12))
