# CPU demo: a tiny UperNet (atto-width ConvNeXtDCLS, dilated kernel 9) trained for a few
# iterations on the ADE20K-format demo data of dcls_mm.datasets.make_ade20k_demo and
# evaluated with the real IoUMetric, sliding-window test as in the recipe. Structure,
# pipeline shape, losses and optimizer constructor are those of the full T-dcls recipe
# config; only sizes shrink (crop 512 -> 64, stride 341 -> 43).
#   python -c "from dcls_mm.datasets import make_ade20k_demo; make_ade20k_demo('work_dirs/demo/data/ade')"
#   python tools/train.py configs/demo/upernet_convnext-dcls-atto_demo-ade20k-64x64.py
_base_ = '../upernet/upernet_convnext-dcls-t_8xb2-amp-160k_ade20k-512x512.py'

data_root = 'work_dirs/demo/data/ade'
# Four of ADE20K's 150 classes (indices 0..3): mmseg maps every other class to 255.
metainfo = dict(classes=('wall', 'building', 'sky', 'floor'),
                palette=[[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]])
num_classes = 4
crop_size = (64, 64)

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(arch='atto', dilated_kernel_size=9, kernel_count=None, drop_path_rate=0.1,
                  init_cfg=None),
    decode_head=dict(in_channels=[40, 80, 160, 320], channels=32, num_classes=num_classes),
    auxiliary_head=dict(in_channels=160, channels=16, num_classes=num_classes),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(43, 43)))

# The ADE20K pipeline of the recipe, scaled from (2048, 512) / crop 512 to (512, 128) / 64.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
# `tools/test.py --tta`: the recipe's multi-scale + flip test, at the demo's size. The
# inherited tta_pipeline resizes to 0.5..1.75 x (2048, 512): 12 views of up to 896 px for
# a 64 px image (24 minutes for the 4 demo images); here short sides 64 and 96, x flip.
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(int(512 * r), int(128 * r)), keep_ratio=True)
             for r in (0.5, 0.75)],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations', reduce_zero_label=True)],
            [dict(type='PackSegInputs')],
        ])
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

# A few iterations, then one validation pass.
max_iters = 4
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=2),
    dict(type='PolyLR', power=1.0, begin=2, end=max_iters, eta_min=0.0, by_epoch=False)
]
# fp32 on the CPU (AmpOptimWrapper needs a GPU); same DCLS-aware constructor.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='dcls_mm.DCLSLearningRateDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6,
                       position_lr_mult=1.0))

default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(by_epoch=False, interval=max_iters),
                     visualization=dict(draw=False))
env_cfg = dict(cudnn_benchmark=False)
