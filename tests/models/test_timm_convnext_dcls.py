"""timm registration of convnext_dcls_{tiny,small,base}."""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip('timm')

import dcls_mm.models  # noqa: E402,F401  (registers the timm models)
from dcls_mm.models.classifiers import ConvNeXtDCLSClassifier  # noqa: E402

from ._synthetic import (SMALL_ARCH, add_classifier_head, published_backbone_shapes,  # noqa: E402
                         random_backbone_state, set_weights_directly)

K, DKS = 5, 7
SMALL = dict(arch=SMALL_ARCH, kernel_count=K, dilated_kernel_size=DKS)
X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('name', ['convnext_dcls_tiny', 'convnext_dcls_small',
                                  'convnext_dcls_base'])
def test_registered_with_pretrained_cfg(name):
    assert name in timm.list_models('convnext_dcls*')
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.crop_pct == 0.875 and cfg.interpolation == 'bicubic'
    assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000
    assert tuple(cfg.mean) == timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(cfg.std) == timm.data.IMAGENET_DEFAULT_STD


def test_tiny_key_names_and_shapes():
    with torch.device('meta'):
        model = timm.create_model('convnext_dcls_tiny')
    expected = published_backbone_shapes((3, 3, 9, 3), (96, 192, 384, 768), 34)
    expected.update({'norm.weight': (768,), 'norm.bias': (768,), 'head.weight': (1000, 768),
                     'head.bias': (1000,)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dict(expected)
    assert model.pretrained_cfg['crop_pct'] == 0.875


def _expected_logits(model, sd):
    ref = ConvNeXtDCLSClassifier(**SMALL).eval()
    set_weights_directly(ref, sd)
    with torch.no_grad():
        feat = ref.forward_features(X)
        pooled = F.layer_norm(feat.mean((-2, -1)), (32,), sd['norm.weight'], sd['norm.bias'], 1e-6)
        return pooled @ sd['head.weight'].T + sd['head.bias']


def test_create_and_load_published_checkpoint(tmp_path):
    sd = add_classifier_head(random_backbone_state(SMALL_ARCH['depths'], SMALL_ARCH['dims'], K,
                                                   DKS), SMALL_ARCH['dims'])
    path = tmp_path / 'convnext_dcls_tiny_1k_224_ema.pth'
    torch.save({'model': sd}, path)
    model = timm.create_model('convnext_dcls_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL).eval()
    with torch.no_grad():
        logits = model(X)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, _expected_logits(model, sd))
    # checkpoint_path= (timm's own loader, no remapping needed for this format)
    model2 = timm.create_model('convnext_dcls_tiny', checkpoint_path=str(path), **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(X), logits)
    # another number of classes: trunk loaded, new head
    model3 = timm.create_model('convnext_dcls_tiny', pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(path)), **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(model3.forward_head(model3.forward_features(X), pre_logits=True),
                                   model.forward_head(model.forward_features(X), pre_logits=True))
    assert model3(X).shape == (2, 10)


def test_bad_checkpoint_raises(tmp_path):
    sd = add_classifier_head(random_backbone_state(SMALL_ARCH['depths'], SMALL_ARCH['dims'], K,
                                                   DKS), SMALL_ARCH['dims'])
    del sd['stages.1.0.pwconv1.bias']
    path = tmp_path / 'bad.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(ValueError, match=r'missing keys \(1\): stages\.1\.0\.pwconv1\.bias'):
        timm.create_model('convnext_dcls_tiny', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
