# Dense baseline: the SAME recipe and backbone class with plain 7x7 depthwise convs
# (dwconv_type='dense'), i.e. ConvNeXt-B (docs/recipes.md row "ConvNeXt-B").
_base_ = './cascade-mask-rcnn_convnext-dcls-b_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

# The official ConvNeXt IN-1k weights (github.com/facebookresearch/ConvNeXt,
# convnext_base_1k_224.pth: a {'model': ...} file with the same key names, loaded by
# the same checked loader as the DCLS files).
checkpoint_file = 'checkpoints/convnext_base_1k_224.pth'

model = dict(
    backbone=dict(
        dwconv_type='dense',
        kernel_count=None,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
