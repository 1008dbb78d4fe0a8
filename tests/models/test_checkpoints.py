"""Loading published-format, downstream, dcls-mm and reference-gaussian checkpoints."""
import pickle

import pytest
import torch

from dcls_mm.models import ConvNeXtDCLS, checkpoint_filter_fn, load_checkpoint_file

from tests._helpers import ROOT, load_tool

from ..ops.dense_reference import reference_gauss_axis_kernel
from ._synthetic import (SMALL_ARCH, add_classifier_head, downstream_state,
                         published_backbone_shapes, random_backbone_state,
                         set_weights_directly)

K, DKS = 5, 7
X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def build(**kwargs):
    kwargs.setdefault('arch', SMALL_ARCH)
    kwargs.setdefault('kernel_count', K)
    kwargs.setdefault('dilated_kernel_size', DKS)
    return ConvNeXtDCLS(**kwargs)


def loaded(path, **kwargs):
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


def outputs(model):
    with torch.no_grad():
        return model.eval()(X)


def trunk():
    return random_backbone_state(SMALL_ARCH['depths'], SMALL_ARCH['dims'], K, DKS)


def test_real_tiny_key_names_and_shapes():
    with torch.device('meta'):
        model = ConvNeXtDCLS('tiny')
    expected = published_backbone_shapes((3, 3, 9, 3), (96, 192, 384, 768), 34)
    for i, c in enumerate((96, 192, 384, 768)):
        expected[f'norm{i}.weight'] = expected[f'norm{i}.bias'] = (c,)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == dict(expected)
    with torch.device('meta'):
        base = ConvNeXtDCLS('base')
    assert base.state_dict()['stages.2.26.dwconv.P'].shape == (2, 512, 1, 40)


def test_published_classification_format(tmp_path):
    sd = trunk()
    path = tmp_path / 'cls.pth'
    torch.save({'model': add_classifier_head(sd, SMALL_ARCH['dims'])}, path)
    model = loaded(path)
    direct = build()
    set_weights_directly(direct, {**sd, **{k: v for k, v in direct.state_dict().items()
                                           if k.startswith('norm')}})
    for a, b in zip(outputs(model), outputs(direct)):
        torch.testing.assert_close(a, b)
    # the output norms are new layers: fresh LayerNorm init
    assert torch.all(model.norm0.weight == 1) and torch.all(model.norm0.bias == 0)
    assert torch.equal(model.stages[1][0].dwconv.P, sd['stages.1.0.dwconv.P'])


def test_classification_final_norm_goes_to_norm3_for_classifier_trunk(tmp_path):
    sd = add_classifier_head(trunk(), SMALL_ARCH['dims'])
    path = tmp_path / 'cls.pth'
    torch.save({'model': sd}, path)
    model = loaded(path, out_indices=(3,), gap_before_final_norm=True)
    assert torch.equal(model.norm3.weight, sd['norm.weight'])


def test_published_downstream_format(tmp_path):
    sd = trunk()
    full = downstream_state(sd, SMALL_ARCH['dims'])
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': full, 'meta': {'epoch': 36}}, path)
    model = loaded(path)
    direct = build()
    set_weights_directly(direct, {k[len('backbone.'):]: v for k, v in full.items()
                                  if k.startswith('backbone.')})
    for a, b in zip(outputs(model), outputs(direct)):
        torch.testing.assert_close(a, b)
    # explicit mmengine-style prefix
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    model.init_weights()
    for a, b in zip(outputs(model), outputs(direct)):
        torch.testing.assert_close(a, b)
    # fewer outputs than the checkpoint has norms: the extra norms are ignored
    partial = loaded(path, out_indices=(1, 3))
    torch.testing.assert_close(outputs(partial)[1], outputs(direct)[3])
    # the Pretrained entry as a one-element list (mmengine's own loader took it: no
    # prefix stripping, 0 of the keys loaded, a warning only)
    model = build(init_cfg=[dict(type='Pretrained', checkpoint=str(path))])
    model.init_weights()
    for a, b in zip(outputs(model), outputs(direct)):
        torch.testing.assert_close(a, b)
    model = build(init_cfg=[dict(type='Pretrained', checkpoint=str(path)),
                            dict(type='Constant', layer='Linear', val=0)])
    with pytest.raises(ValueError, match='give the Pretrained entry alone'):
        model.init_weights()


def test_own_mmengine_training_checkpoint(tmp_path):
    from mmengine.logging import HistoryBuffer, MessageHub
    src = build()
    hub = MessageHub('test_ckpt')
    hub.update_scalar('train/loss', 1.5)
    ckpt = {'meta': {'epoch': 1, 'iter': 10, 'mmengine_version': '0.10'},
            'state_dict': {'backbone.' + k: v for k, v in src.state_dict().items()},
            'message_hub': hub.state_dict(), 'optimizer': {}}
    assert any(isinstance(v, HistoryBuffer) for v in ckpt['message_hub']['log_scalars'].values())
    path = tmp_path / 'epoch_1.pth'
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses it ...
        torch.load(path, weights_only=True)
    model = loaded(path)  # ... our loader allows mmengine's globals explicitly
    for a, b in zip(outputs(model), outputs(src)):
        torch.testing.assert_close(a, b)


def test_mmengine_own_loader_reads_training_checkpoints_after_import(tmp_path):
    """What `mim train --resume` and mmdet/mmseg's tools call: mmengine's CheckpointLoader.
    register_checkpoint_loader (made by `import dcls_mm.engine`) routes it to the checked
    loader (torch's weights_only default would refuse the message hub)."""
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import CheckpointLoader

    from dcls_mm.engine import register_checkpoint_loader
    register_checkpoint_loader()
    hub = MessageHub('test_ckpt_mmengine')
    hub.update_scalar('train/loss', 0.5)
    path = tmp_path / 'iter_5.pth'
    torch.save({'meta': {'iter': 5}, 'state_dict': {'w': torch.ones(2)},
                'message_hub': hub.state_dict()}, path)
    ckpt = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert ckpt['meta']['iter'] == 5 and torch.equal(ckpt['state_dict']['w'], torch.ones(2))
    torch.save({'state_dict': {'w': torch.ones(1)}, 'extra': _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')


_HOOKUP_PROBE = """
import sys, torch
from mmengine.logging import MessageHub
from mmengine.runner.checkpoint import CheckpointLoader
hub = MessageHub('probe')
hub.update_scalar('train/loss', 0.5)
torch.save({'meta': {'iter': 5}, 'state_dict': {'w': torch.ones(2)},
            'message_hub': hub.state_dict()}, sys.argv[1])
import dcls_mm.models
def readable():
    try:
        return CheckpointLoader.load_checkpoint(sys.argv[1])['meta']['iter'] == 5
    except Exception:
        return False
print('models:', readable())
import dcls_mm.engine
print('engine:', readable())
"""


def test_only_dcls_mm_engine_hooks_the_checked_loader_into_mmengine(tmp_path):
    """`import dcls_mm.models` leaves mmengine's loader alone (a training checkpoint stays
    unreadable under torch's weights_only default); `import dcls_mm.engine` (configs'
    custom_imports, the tools) makes mmengine read it. A fresh process: the suite's
    other imports must not decide the answer."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, '-c', _HOOKUP_PROBE, str(tmp_path / 'iter_5.pth')],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [ln for ln in out.stdout.splitlines() if ln.startswith(('models:', 'engine:'))]
    assert answers == ['models: False', 'engine: True'], out.stdout


class _Evil:
    def __reduce__(self):
        return (print, ('pwned',))


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'x': torch.zeros(1)}, 'extra': _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
        load_checkpoint_file(str(path))


def test_reference_gauss_checkpoint(tmp_path):
    ref = random_backbone_state(SMALL_ARCH['depths'], SMALL_ARCH['dims'], K, DKS, with_sig=True)
    # make the two axes clearly different so a missing conversion would show
    for k in ref:
        if k.endswith('.SIG'):
            ref[k][0] = 0.2
            ref[k][1] = 1.5
    path = tmp_path / 'gauss.pth'
    torch.save({'model': add_classifier_head(ref, SMALL_ARCH['dims'])}, path)
    model = loaded(path, interpolation='gaussian')  # 'auto': SIG and no meta
    direct = build(interpolation='gaussian')
    ours = {k: v.flip(0) if k.endswith(('.P', '.SIG')) else v for k, v in ref.items()}
    set_weights_directly(direct, {**ours, **{k: v for k, v in direct.state_dict().items()
                                             if k.startswith('norm')}})
    for a, b in zip(outputs(model), outputs(direct)):
        torch.testing.assert_close(a, b)
    assert torch.equal(model.stages[0][0].dwconv.SIG[1], torch.full((8, 1, K), 0.2))
    # forcing 'dcls_mm' keeps the file's order (a transposed model)
    raw = loaded(path, interpolation='gaussian', checkpoint_format='dcls_mm')
    assert torch.equal(raw.stages[0][0].dwconv.SIG[0], torch.full((8, 1, K), 0.2))
    # the loaded kernel is the one the reference package builds from the file
    prefix = 'stages.2.1.dwconv.'
    expected = reference_gauss_axis_kernel(ref[prefix + 'weight'], ref[prefix + 'P'],
                                         ref[prefix + 'SIG'], DKS)
    with torch.no_grad():
        kernel = model.stages[2][1].dwconv.construct_kernel()
    torch.testing.assert_close(kernel.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw.stages[2][1].dwconv.construct_kernel().detach().double(),
                              expected, rtol=1e-5, atol=1e-6)
    # a dcls-mm checkpoint (has meta) with SIG is not converted
    torch.save({'meta': {}, 'state_dict': direct.state_dict()}, tmp_path / 'own.pth')
    own = loaded(tmp_path / 'own.pth', interpolation='gaussian')
    for a, b in zip(outputs(own), outputs(direct)):
        torch.testing.assert_close(a, b)


def test_errors_list_bad_keys(tmp_path):
    model = build()
    sd = trunk()
    bad = dict(sd)
    bad['stages.0.0.extra'] = torch.zeros(1)
    bad['stages.1.0.dwconv.weight'] = torch.zeros(16, 1, K + 1)
    del bad['stages.3.0.gamma']
    with pytest.raises(ValueError) as info:
        checkpoint_filter_fn({'model': bad}, model)
    msg = str(info.value)
    assert 'unexpected keys (1): stages.0.0.extra' in msg
    assert 'stages.1.0.dwconv.weight: checkpoint (16, 1, 6) vs model (16, 1, 5)' in msg
    assert 'missing keys (1): stages.3.0.gamma' in msg
    # SIG in a bilinear model: unexpected
    gauss = random_backbone_state(SMALL_ARCH['depths'], SMALL_ARCH['dims'], K, DKS, with_sig=True)
    with pytest.raises(ValueError, match='SIG'):
        checkpoint_filter_fn({'model': gauss}, model)
    # different positions across the blocks of a shared stage
    diff = dict(sd)
    diff['stages.2.1.dwconv.P'] = diff['stages.2.1.dwconv.P'] + 0.5
    torch.save({'model': diff}, tmp_path / 'diff.pth')
    with pytest.raises(ValueError, match=r'stages\.2\.1\.dwconv\.P'):
        loaded(tmp_path / 'diff.pth')
    # ... which load fine into a model without sharing
    unshared = loaded(tmp_path / 'diff.pth', share_positions=False)
    assert torch.equal(unshared.stages[2][1].dwconv.P, diff['stages.2.1.dwconv.P'])
    with pytest.raises(ValueError, match='no state dict'):
        checkpoint_filter_fn({'epoch': 3}, model)


def test_converter_roundtrip(tmp_path):
    mod = load_tool('tools/model_converters/convert_convnext_dcls.py')
    sd = trunk()
    src = tmp_path / 'cls.pth'
    torch.save({'model': add_classifier_head(sd, SMALL_ARCH['dims'])}, src)
    dst = tmp_path / 'clean.pth'
    mod.main([str(src), str(dst), '--dilated-kernel-size', str(DKS)])
    out = torch.load(dst, weights_only=True)
    assert out['meta']['backbone']['kernel_count'] == K
    assert out['meta']['backbone']['arch'] == dict(depths=[2, 1, 2, 1], dims=[8, 16, 24, 32])
    # the trunk, and the classifier's final norm (it was dropped once: a backbone with
    # gap_before_final_norm then kept a fresh norm3 without an error)
    assert set(out['state_dict']) == set(sd) | {'norm.weight', 'norm.bias'}
    for kwargs in ({}, dict(out_indices=(3,), gap_before_final_norm=True)):
        a = loaded(dst, **kwargs)
        b = loaded(src, **kwargs)
        for x, y in zip(outputs(a), outputs(b)):
            torch.testing.assert_close(x, y)
    assert not torch.all(a.norm3.weight == 1)


@pytest.mark.parametrize('damage, expected', [
    (lambda s: s.pop('stages.1.0.norm.weight'), 'missing keys (1): stages.1.0.norm.weight'),
    (lambda s: s.pop('downsample_layers.0.0.weight'),
     "no key 'downsample_layers.0.0.weight' (the stem)"),
    (lambda s: s.__setitem__('stages.0.0.norm.weight', torch.ones(9)),
     'shape mismatches (1): stages.0.0.norm.weight: checkpoint (9,) vs model (8,)'),
    (lambda s: s.__setitem__('stages.0.0.dwconv.weight', torch.ones(8, 1, K + 1)),
     f'shape mismatches (1): stages.0.0.dwconv.weight: checkpoint (8, 1, {K + 1}) vs '
     f'model (8, 1, {K})'),
])
def test_converter_reports_one_damaged_key_once(tmp_path, damage, expected):
    """A single missing or wrong-shaped tensor is named alone (the architecture is
    inferred by majority over every key, so one bad tensor cannot change it), in one
    error line without a traceback."""
    import subprocess
    import sys
    sd = trunk()
    damage(sd)
    src = tmp_path / 'damaged.pth'
    torch.save({'model': add_classifier_head(sd, SMALL_ARCH['dims'])}, src)
    out = subprocess.run([sys.executable, str(ROOT / 'tools/model_converters/convert_convnext_dcls.py'),
                          str(src), str(tmp_path / 'out.pth'), '--dilated-kernel-size', str(DKS)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert 'Traceback' not in out.stderr and expected in out.stderr, out.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_bilinear_normalized_model_needs_the_format_of_a_file_without_meta(tmp_path):
    """The reference package's v1 ('bilinear_normalized') stores P[0] = width; `auto`
    once kept such a file as it was (every kernel transposed, no error)."""
    sd = trunk()
    path = tmp_path / 'v1.pth'
    swapped = {k: (v.flip(0) if k.endswith('.P') else v) for k, v in sd.items()}
    torch.save({'model': add_classifier_head(swapped, SMALL_ARCH['dims'])}, path)
    with pytest.raises(ValueError, match="checkpoint_format='reference_gauss'"):
        loaded(path, interpolation='bilinear_normalized')
    model = loaded(path, interpolation='bilinear_normalized',
                   checkpoint_format='reference_gauss')
    assert torch.equal(model.stages[1][0].dwconv.P, sd['stages.1.0.dwconv.P'])
    # the published bilinear files (v0, P[0] = height) still load as they are
    assert torch.equal(loaded(path).stages[1][0].dwconv.P, swapped['stages.1.0.dwconv.P'])
