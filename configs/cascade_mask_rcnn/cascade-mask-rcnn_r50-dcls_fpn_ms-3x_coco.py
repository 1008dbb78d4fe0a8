# Cascade Mask R-CNN, ResNet-50-dcls backbone, mmdet 3.3.0's standard ResNet-50 3x
# multi-scale recipe (cascade_rcnn/cascade-mask-rcnn_r50_fpn_ms-3x_coco.py: SGD lr 0.02,
# momentum 0.9, wd 1e-4, 36 epochs as RepeatDataset x3 of 12, BN frozen stem + stage 1,
# norm_eval) unchanged except:
# - the backbone: mmdet's ResNet-50 wrapped by dcls_mm.DCLSConverted, i.e. the DCLS
#   paper's ResNet-50-dcls: every bottleneck 3x3 conv (layer*.conv2) -> DCLS with
#   dilated kernel 7 at iso-parameters (kernel_count 5/6/6/5 per stage), one set of
#   positions per stage, bilinear interpolation; the 7x7 stem and 1x1 convs stay dense;
# - positions get weight decay 0 (the DCLS paper's rule), through a custom key of
#   mmengine's default constructor (every DCLS position parameter is named `P`), which
#   adds each shared position tensor once (bypass_duplicate).
# Not trained here: no result is claimed (see README.md).
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_ms-3x_coco.py', '../_base_/det_tta.py']

# dcls_mm.models.det_tta: the --tta model
custom_imports = dict(imports=['dcls_mm.models', 'dcls_mm.engine', 'dcls_mm.models.det_tta'],
                      allow_failed_imports=False)

# An ImageNet-1k ResNet-50-dcls checkpoint: timm.create_model('resnet50_dcls') trained on
# ImageNet (none is published). Its key names (conv1, bn1, layer*.*, fc) are mmdet's
# ResNet names; `fc` is ignored with one log line. A dense ResNet-50 (torchvision://resnet50)
# can initialise only an exact conversion: kernel_count=None, init='exact'.
checkpoint_file = 'checkpoints/resnet50_dcls_in1k.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='dcls_mm.DCLSConverted',
        backbone=dict(
            type='mmdet.ResNet',
            depth=50,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            frozen_stages=1,
            norm_cfg=dict(type='BN', requires_grad=True),
            norm_eval=True,
            style='pytorch'),
        dilated_kernel_size=7,
        kernel_count='iso',
        interpolation='bilinear',
        init='random',
        select='layer*.conv2',
        share_positions=['layer1.*', 'layer2.*', 'layer3.*', 'layer4.*'],
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))

# bypass_duplicate: a position tensor shared by the blocks of a stage is one parameter
optim_wrapper = dict(
    paramwise_cfg=dict(bypass_duplicate=True, custom_keys={'.P': dict(decay_mult=0.0)}))
