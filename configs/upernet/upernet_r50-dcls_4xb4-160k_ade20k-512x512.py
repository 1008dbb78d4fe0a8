# UperNet 160k, ADE20K 512x512, ResNet-50-dcls backbone, mmseg 1.2.2's standard
# ResNet-50 recipe (upernet/upernet_r50_4xb4-160k_ade20k-512x512.py: SGD lr 0.01,
# momentum 0.9, wd 5e-4, poly (power 0.9, eta_min 1e-4), 4 GPUs x 4 images, SyncBN,
# UPerHead 512 ch + aux FCNHead 0.4) unchanged except:
# - the backbone: the DCLS paper's ResNet-50-dcls through dcls_mm.DCLSConverted (every
#   bottleneck 3x3 conv -> DCLS, dilated kernel 7, iso-parameters, positions shared per
#   stage). mmseg's recipe uses ResNetV1c (3-conv stem); this config uses mmseg's ResNet
#   (7x7 stem, the paper's and timm's resnet50_dcls layout), so that the one ImageNet
#   ResNet-50-dcls checkpoint below initialises it, as it does the COCO config;
# - positions get weight decay 0 (custom key `.P` of mmengine's default constructor,
#   which adds each shared position tensor once: bypass_duplicate).
# Not trained here: no result is claimed (see README.md).
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['dcls_mm.models', 'dcls_mm.engine'], allow_failed_imports=False)

# An ImageNet-1k ResNet-50-dcls checkpoint (timm.create_model('resnet50_dcls') trained on
# ImageNet; none is published), loaded by DCLSConverted (`fc` ignored with one log line).
checkpoint_file = 'checkpoints/resnet50_dcls_in1k.pth'
norm_cfg = dict(type='SyncBN', requires_grad=True)

model = dict(
    # the base's `pretrained` would be handed to the wrapper; the wrapper's init_cfg loads
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='dcls_mm.DCLSConverted',
        backbone=dict(
            type='mmseg.ResNet',
            depth=50,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            dilations=(1, 1, 1, 1),
            strides=(1, 2, 2, 2),
            norm_cfg=norm_cfg,
            norm_eval=False,
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
