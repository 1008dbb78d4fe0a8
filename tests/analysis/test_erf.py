"""ERF (dcls_mm.analysis.erf) against dense formulas: a linear layer's ERF is the sum
over channels of its kernel's magnitude, placed around the centre output pixel."""
import json
import os.path as osp
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dcls_mm.analysis.erf import (area_ratios, compute_erf, load_erf_images, normalize_erf,
                                  run_erf)
from dcls_mm.models import ConvNeXtDCLS
from dcls_mm.ops import Dcls2d

TINY = dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8])


def _expected_linear_erf(kernel, size):
    """|kernel| summed over channels, centred on the centre output pixel (stride 1,
    'same' padding: output (y, x) sees inputs y - L//2 + i, x - L//2 + j); the same for
    every image, so also their mean."""
    L = kernel.shape[-1]
    expected = np.zeros((size, size))
    top = size // 2 - L // 2
    expected[top:top + L, top:top + L] = kernel.abs().sum(0).numpy()
    return expected


def test_dense_depthwise_erf_is_its_kernel_support():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 5, padding=2, groups=3, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(3, 1, 5, 5) + 0.1)  # no zero tap
    images = [torch.randn(3, 17, 17) for _ in range(2)]
    erf = compute_erf(conv, images, progress=False)
    expected = _expected_linear_erf(conv.weight.detach()[:, 0], 17)
    np.testing.assert_allclose(erf, expected, rtol=1e-5)
    support = np.zeros((17, 17), bool)
    support[6:11, 6:11] = True
    assert (erf[support] > 0).all() and (erf[~support] == 0).all()


@pytest.mark.parametrize('version', ['bilinear', 'gaussian'])
def test_dcls_erf_is_nonzero_exactly_where_its_kernel_is(version):
    torch.manual_seed(1)
    layer = Dcls2d(2, 2, kernel_count=3, dilated_kernel_size=7, padding=3, groups=2,
                   interpolation=version)
    with torch.no_grad():  # off-grid positions, bilinear taps spread over 4 cells each
        layer.P.copy_(torch.tensor([[[[-2.5, 0.3, 1.7]], [[2.2, -1.4, 0.0]]],
                                    [[[1.5, -0.6, 3.0]], [[-2.8, 0.9, -3.0]]]]))
    kernel = layer.construct_kernel().detach()[:, 0]
    erf = compute_erf(layer, [torch.randn(1, 2, 15, 15)], progress=False)
    expected = _expected_linear_erf(kernel, 15)
    np.testing.assert_allclose(erf, expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(erf > 0, expected > 0)
    if version == 'bilinear':  # the sparse kernel leaves holes inside the 7x7 window
        assert (expected[4:11, 4:11] == 0).any()


def test_area_ratios_by_hand():
    point = np.zeros((9, 9))
    point[4, 4] = 1.0
    assert area_ratios(point) == {t: dict(side=3, area_ratio=9 / 81)
                                  for t in ('0.2', '0.3', '0.5', '0.99')}
    uniform = np.ones((9, 9))
    # side s holds s^2/81 of the sum; sides 3, 5, 7 (i = 1..3) are tried
    ratios = area_ratios(uniform)
    assert ratios['0.2'] == dict(side=5, area_ratio=25 / 81)   # 9/81 < 0.2 < 25/81
    assert ratios['0.3'] == dict(side=5, area_ratio=25 / 81)   # 25/81 = 0.309
    assert ratios['0.5'] == dict(side=7, area_ratio=49 / 81)
    assert ratios['0.99'] is None                               # 49/81 < 0.99
    np.testing.assert_allclose(normalize_erf(np.array([[0., 9.], [99., 999.]])),
                               np.array([[0., 1.], [2., 3.]]) / 3)


def test_images_from_a_folder_are_resized_and_normalised(tmp_path):
    folder = tmp_path / 'imgs' / 'sub'
    folder.mkdir(parents=True)
    Image.new('RGB', (40, 20), (255, 0, 0)).save(folder / 'a.png')
    Image.new('RGB', (16, 16), (0, 0, 0)).save(folder / 'b.jpg')
    loaders, generated = load_erf_images(str(tmp_path / 'imgs'), 5, 8)
    images = [load() for load in loaders]
    assert len(images) == 2 and not generated and all(x.shape == (3, 8, 8) for x in images)
    red = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    torch.testing.assert_close(images[0][:, 4, 4], red, atol=1e-4, rtol=0)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no image'):
        load_erf_images(str(tmp_path / 'empty'), 1, 8)
    with pytest.raises(ValueError, match='does not exist'):
        load_erf_images(str(tmp_path / 'missing'), 1, 8)


def test_erf_is_a_mean_over_images():
    """RepLKNet averages the maps: the same images counted k times give the same ERF and
    area ratios (a sum made the log-scaled ratios depend on the image count)."""
    torch.manual_seed(0)
    model = ConvNeXtDCLS(TINY, dilated_kernel_size=7, kernel_count=3, layer_scale_init_value=1.0)
    images = [torch.randn(3, 32, 32) for _ in range(2)]
    once = compute_erf(model, images, 'stages.1', progress=False)
    thrice = compute_erf(model, images * 3, 'stages.1', progress=False)
    np.testing.assert_allclose(thrice, once, rtol=1e-12)
    grads, captured = [], []
    model.stages[1].register_forward_hook(lambda m, i, o: captured.append(o))
    for image in images:  # the mean by hand
        x = image[None].clone().requires_grad_(True)
        model(x)
        out = captured.pop()
        h, w = out.shape[-2:]
        (g,) = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), x)
        grads.append(g.abs().sum((0, 1)).double().numpy())
    np.testing.assert_allclose(once, np.mean(grads, 0), rtol=1e-9)
    assert area_ratios(normalize_erf(thrice)) == area_ratios(normalize_erf(once))


def test_run_erf_side_by_side(tmp_path):
    torch.manual_seed(0)
    models = {'dcls': ConvNeXtDCLS(TINY, dilated_kernel_size=7, kernel_count=3,
                                   layer_scale_init_value=1.0),
              'dense': ConvNeXtDCLS(TINY, dwconv_type='dense', layer_scale_init_value=1.0)}
    result = run_erf(models, str(tmp_path), None, num_images=2, size=32, stage=1,
                     progress=False)
    assert result['generated_images'] and 'generated' in result['images']
    for label in models:
        raw = np.load(tmp_path / f'erf_{label}.npy')
        assert raw.shape == (32, 32) and raw.max() > 0
        assert result['models'][label]['layer'] == 'stages.1'
        assert set(result['models'][label]['area_ratios']) == {'0.2', '0.3', '0.5', '0.99'}
    assert json.loads((tmp_path / 'erf.json').read_text()) == result
    assert osp.getsize(tmp_path / 'erf.png') > 0
    with pytest.raises(ValueError, match='no layer'):
        compute_erf(models['dcls'], [torch.randn(3, 32, 32)], 'stages.9', progress=False)
    # labels that become one file name keep a file each
    clash = run_erf({'a (x)': models['dcls'], 'a [x]': models['dense']}, str(tmp_path / 'c'),
                    None, num_images=1, size=32, stage=1, progress=False)
    files = [clash['models'][label]['npy'] for label in ('a (x)', 'a [x]')]
    assert len(set(files)) == 2
    assert not np.array_equal(*(np.load(tmp_path / 'c' / f) for f in files))


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    torch.manual_seed(0)
    model = ConvNeXtDCLS(TINY, dilated_kernel_size=7, kernel_count=3, layer_scale_init_value=1.0)
    loaders, _ = load_erf_images(None, 5, 32)
    full = compute_erf(model, loaders, 'stages.1', progress=False)
    calls = []

    def killed_after(n):
        def load(i):
            if len(calls) == n:
                raise KeyboardInterrupt  # the kill
            calls.append(i)
            return loaders[i]()
        return [partial(load, i) for i in range(5)]

    state = str(tmp_path / 'state.npz')
    with pytest.raises(KeyboardInterrupt):
        compute_erf(model, killed_after(3), 'stages.1', progress=False, state_path=state,
                    state_key='k', save_every=2)
    assert calls == [0, 1, 2]  # image 2 was lost with the kill, images 0-1 were saved
    calls.clear()
    resumed = compute_erf(model, killed_after(99), 'stages.1', progress=False,
                          state_path=state, state_key='k', save_every=2)
    assert calls == [2, 3, 4]
    np.testing.assert_allclose(resumed, full, rtol=1e-12)
    calls.clear()  # another key (other model/images): starts afresh
    compute_erf(model, killed_after(99), 'stages.1', progress=False, state_path=state,
                state_key='other')
    assert calls == [0, 1, 2, 3, 4]
