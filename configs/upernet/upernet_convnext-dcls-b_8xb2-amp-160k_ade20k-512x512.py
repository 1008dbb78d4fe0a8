# UperNet 160k ADE20K 512x512, ConvNeXt-B-dcls (docs/recipes.md: 49.3 / 49.6 mIoU).
# As the T-dcls config, with drop_path 0.4 and stage-wise decay 0.9 with num_layers 12.
_base_ = './upernet_convnext-dcls-t_8xb2-amp-160k_ade20k-512x512.py'

# Zenodo record 7112021: convnext_dcls_base_1k_224_ema.pth
checkpoint_file = 'checkpoints/convnext_dcls_base_1k_224_ema.pth'

model = dict(
    backbone=dict(
        arch='base',
        kernel_count=40,
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))

optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise',
                                        num_layers=12))
