# Test-time augmentation of the detection configs (`tools/test.py --tta`): mmdet 3's
# multi-scale + flip TTA (its configs' scales around the (1333, 800) test scale, NMS 0.5
# over the pooled views, 100 boxes). The model is dcls_mm.DetMaskTTAModel, not mmdet's
# DetTTAModel, which refuses instance masks; configs using this file list
# 'dcls_mm.models.det_tta' in their custom_imports. Not a recipe of the paper (its COCO
# numbers are single-scale).
tta_model = dict(
    type='dcls_mm.DetMaskTTAModel',
    tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))

tta_scales = [(1333, 800), (666, 400), (2000, 1200)]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=s, keep_ratio=True) for s in tta_scales],
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='LoadAnnotations', with_bbox=True)],
            [dict(type='PackDetInputs',
                  meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                             'scale_factor', 'flip', 'flip_direction'))],
        ])
]
