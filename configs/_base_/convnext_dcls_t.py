# The ConvNeXt-T-dcls backbone of the COCO and ADE20K recipes (docs/recipes.md) and the
# reliability hooks of every dcls-mm training config, shared by the detection and the
# segmentation configs. mmengine refuses a key defined in two `_base_` files, and the
# mmdet/mmseg bases already define `model` and `default_hooks`, so the configs take these
# values by name: `backbone={{_base_.convnext_dcls_t_backbone}}` etc.

# Reliability (README): checkpoints written atomically (a kill never leaves a truncated
# one; resume skips a truncated file with one warning), and resume restores the random
# generators and the data position, so k iterations + resume == a straight run.
dcls_mm_default_hooks = dict(checkpoint=dict(type='dcls_mm.AtomicCheckpointHook'))
dcls_mm_custom_hooks = [dict(type='dcls_mm.RNGStateHook')]

# _delete_: replaces the base's (mmpretrain) ConvNeXt. Pretrained: the published IN-1k
# ConvNeXt-T-dcls EMA weights (Zenodo record 7112021, convnext_dcls_tiny_1k_224_ema.pth, a
# {'model': ...} classification checkpoint; the backbone's loader drops head/norm and
# checks every other key).
convnext_dcls_t_backbone = dict(
    _delete_=True,
    type='dcls_mm.ConvNeXtDCLS',
    arch='tiny',
    dwconv_type='dcls',
    dilated_kernel_size=17,
    kernel_count=34,
    interpolation='bilinear',
    share_positions=True,
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.4,
    layer_scale_init_value=1.0,
    gap_before_final_norm=False,
    init_cfg=dict(type='Pretrained',
                  checkpoint='checkpoints/convnext_dcls_tiny_1k_224_ema.pth'))
