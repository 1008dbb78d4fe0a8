# CPU demo: a tiny Cascade Mask R-CNN (atto-width ConvNeXtDCLS, dilated kernel 9) trained
# for one short epoch on the COCO-format demo data of dcls_mm.datasets.make_coco_demo and
# evaluated with the real CocoMetric (pycocotools). Structure, pipeline shape, loss and
# optimizer constructor are those of the full T-dcls recipe config; only sizes shrink.
#   python -c "from dcls_mm.datasets import make_coco_demo; make_coco_demo('work_dirs/demo/data/coco')"
#   python tools/train.py configs/demo/cascade-mask-rcnn_convnext-dcls-atto_fpn_4conv1fc-giou_ms-crop-1e_demo-coco.py
_base_ = '../cascade_mask_rcnn/cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'

data_root = 'work_dirs/demo/data/coco/'
classes = ('square', 'disc', 'triangle')
num_classes = len(classes)
width = 32  # FPN / RoI feature channels (256 in the recipe)


def _bbox_head(stds):
    return dict(
        type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=width,
        conv_out_channels=width, fc_out_channels=64, roi_feat_size=7,
        num_classes=num_classes,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                        target_stds=stds),
        reg_class_agnostic=False, reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),  # BN on a single CPU process
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(arch='atto', dilated_kernel_size=9, kernel_count=None, drop_path_rate=0.1,
                  init_cfg=None),
    neck=dict(in_channels=[40, 80, 160, 320], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=[_bbox_head([0.1, 0.1, 0.2, 0.2]), _bbox_head([0.05, 0.05, 0.1, 0.1]),
                   _bbox_head([0.033, 0.033, 0.067, 0.067])],
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width, num_classes=num_classes)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200)),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)))
del _bbox_head

# The ms-crop pipeline of the recipe, scaled from ~800 px to ~128 px.
_scales = [(96, 160), (112, 160), (128, 160)]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice', transforms=[
        [dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)],
        [dict(type='RandomChoiceResize', scales=[(80, 160), (96, 160)], keep_ratio=True),
         dict(type='RandomCrop', crop_type='absolute_range', crop_size=(64, 96),
              allow_negative_crop=True),
         dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)]]),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
del _scales
# `tools/test.py --tta`: the recipe's multi-scale + flip test at the demo's size (the
# inherited scales are around (1333, 800)).
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=s, keep_ratio=True) for s in [(128, 80), (160, 96)]],
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='LoadAnnotations', with_bbox=True)],
            [dict(type='PackDetInputs',
                  meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                             'scale_factor', 'flip', 'flip_direction'))],
        ])
]

train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                 ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=8),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                 ann_file='annotations/instances_val2017.json',
                 data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# One epoch (num_images / 2 iterations), then one validation pass.
train_cfg = dict(max_epochs=1, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2),
    dict(type='MultiStepLR', begin=0, end=1, by_epoch=True, milestones=[27, 33], gamma=0.1)
]
# fp32 on the CPU (AmpOptimWrapper needs a GPU); same DCLS-aware constructor.
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=1e-4))

default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
env_cfg = dict(cudnn_benchmark=False)
