"""timm registration of convnext_dcls_{tiny,small,base}."""
import re

import pytest
import timm
import torch

import dcls_mm.models  # noqa: F401  (registers the timm models)
from dcls_mm.models import ConvNeXtDCLS

from tests._helpers import ROOT

from ._synthetic import (SMALL_ARCH, add_classifier_head, published_backbone_shapes,
                         random_backbone_state)

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


def _expected_logits(sd):
    """Logits of the published classifier for ``sd``, independently of the timm wrapper:
    the trunk (stem/downsampling + stages) of a separately built ``ConvNeXtDCLS``
    backbone holding ``sd``'s trunk weights, then global average pooling, LayerNorm
    (eps 1e-6) and the linear head written out here."""
    trunk = ConvNeXtDCLS(**SMALL, out_indices=(3,)).eval()
    copied = set()
    with torch.no_grad():
        for name, p in trunk.named_parameters(remove_duplicate=False):
            if name in sd:
                p.copy_(sd[name])
                copied.add(name)
    assert {n for n, _ in trunk.named_parameters(remove_duplicate=False)} - copied == {
        'norm3.weight', 'norm3.bias'}  # the backbone's output norm, not the head's
    with torch.no_grad():
        feat = X
        for i in range(4):
            feat = trunk.stages[i](trunk.downsample_layers[i](feat))
    pooled = feat.mean((-2, -1)).double()
    mu = pooled.mean(-1, keepdim=True)
    var = ((pooled - mu) ** 2).mean(-1, keepdim=True)
    normed = (pooled - mu) / torch.sqrt(var + 1e-6) * sd['norm.weight'].double() + \
        sd['norm.bias'].double()
    return (normed @ sd['head.weight'].double().T + sd['head.bias'].double()).float()


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
    torch.testing.assert_close(logits, _expected_logits(sd))
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


def _readme_python_block(marker):
    """The README's python code block that contains ``marker``, as written."""
    text = (ROOT / 'README.md').read_text()
    blocks = [b for b in re.findall(r'```python\n(.*?)```', text, re.S) if marker in b]
    assert len(blocks) == 1, f'{len(blocks)} README python blocks mention {marker}'
    return blocks[0]


@pytest.mark.slow  # full-size ConvNeXt-T (gaussian, 23x23)
def test_readme_snippet_loads_the_reference_gaussian_file(tmp_path, monkeypatch):
    """The README's timm line for the reference gaussian ConvNeXt-T, run as written, on a
    synthetic file with the published names and shapes (tiny, dks 23, K 26, positions
    AND SIG shared per stage, ``{'model': ...}``, the reference axis order)."""
    name = 'convnext_dcls_gauss_tiny_1k_224_ema.pth'
    snippet = _readme_python_block(name)
    depths, dims = (3, 3, 9, 3), (96, 192, 384, 768)
    ref = random_backbone_state(depths, dims, 26, 23, with_sig=True)
    for key in ref:
        if key.endswith('.SIG'):  # the two axes told apart
            ref[key][0], ref[key][1] = 0.2, 1.5
    published = add_classifier_head(ref, dims)
    torch.save({'model': published}, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(snippet, scope)
    model = scope['model']
    dwconv = model.stages[2][1].dwconv
    assert dwconv.dilated_kernel_size == (23, 23) and dwconv.kernel_count == 26
    # the file's P[0]/SIG[0] act on the width: in dcls-mm order they are P[1]/SIG[1]
    assert torch.equal(dwconv.SIG[1], torch.full_like(dwconv.SIG[1], 0.2))
    assert torch.equal(dwconv.SIG[0], torch.full_like(dwconv.SIG[0], 1.5))
    assert torch.equal(dwconv.P, ref['stages.2.1.dwconv.P'].flip(0))
    assert torch.equal(model.head.weight, published['head.weight'])
    # what the README explains: without the format, timm's unwrapped file is ambiguous
    ambiguous = snippet.replace("checkpoint_format='reference_gauss',", '')
    assert ambiguous != snippet
    with pytest.raises(ValueError, match='position axis order is unknown'):
        exec(ambiguous, {})
