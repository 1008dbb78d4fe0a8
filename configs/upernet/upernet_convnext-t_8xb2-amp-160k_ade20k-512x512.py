# Dense baseline: the SAME recipe and backbone class with plain 7x7 depthwise convs
# (dwconv_type='dense'), i.e. ConvNeXt-T (docs/recipes.md row "ConvNeXt-T").
_base_ = './upernet_convnext-dcls-t_8xb2-amp-160k_ade20k-512x512.py'

# The official ConvNeXt IN-1k weights (github.com/facebookresearch/ConvNeXt,
# convnext_tiny_1k_224.pth: a {'model': ...} file with the same key names, loaded by
# the same checked loader as the DCLS files).
checkpoint_file = 'checkpoints/convnext_tiny_1k_224.pth'

model = dict(
    backbone=dict(
        dwconv_type='dense',
        kernel_count=None,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
