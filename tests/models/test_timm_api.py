"""timm's model API on the DCLS classifiers, call by call against timm's own models.

Every DCLS model is built with a tiny arch and compared with timm's model of the same
structure (``pretrained=False``): ``convnext_dcls_*`` with ``convnext_tiny`` of the same
depths and widths, ``resnet50_dcls`` (when registered) with ``resnet50`` of the same
depths. The same call must give the same shapes, channels, reductions and number of
outputs (or fail on both). Values are checked against
independent references: pooling and LayerNorm written out here, forward hooks, torch.fx
graphs, and timm's own name mapping for the layer-decay groups.
"""
import re

import pytest
import timm
import torch
from PIL import Image
from timm.models import convnext as timm_convnext
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torchvision.models.feature_extraction import create_feature_extractor

import dcls_mm.models  # noqa: F401  (registers the timm models)
from dcls_mm.ops import Dcls2d

from ._synthetic import SMALL_ARCH, add_classifier_head, random_backbone_state

K, DKS = 5, 7
DEPTHS, DIMS = SMALL_ARCH['depths'], SMALL_ARCH['dims']
TINY = dict(arch=SMALL_ARCH, kernel_count=K, dilated_kernel_size=DKS)
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _convnext_names(model, ref):
    """Our parameter name -> timm's ConvNeXt name of the same weight, by timm's own
    converter of the published (facebookresearch) key names."""
    ours = {n: p.detach() for n, p in model.named_parameters() if n not in _positions(model)}
    return dict(zip(ours, timm_convnext.checkpoint_filter_fn(ours, ref)))


def _same_names(model, ref):
    """Converted timm models keep timm's names."""
    return {n: n for n, _ in model.named_parameters() if n not in _positions(model)}


def _positions(model):
    return {n for n, _ in model.named_parameters() if n.rsplit('.', 1)[-1] in ('P', 'SIG')}


#: (DCLS model, its tiny kwargs, timm reference, the reference's kwargs, name mapping)
CASES = [('convnext_dcls_tiny', TINY, 'convnext_tiny', dict(depths=DEPTHS, dims=DIMS),
          _convnext_names)]
if 'resnet50_dcls' in timm.list_models('resnet50_dcls'):
    RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 24, 32), stem_width=8)
    CASES.append(('resnet50_dcls', RESNET, 'resnet50', RESNET, _same_names))
IDS = [c[0] for c in CASES]


def _pair(case, **kwargs):
    name, kw, ref_name, ref_kw = case[:4]
    torch.manual_seed(0)
    model = timm.create_model(name, **kw, **kwargs).eval()
    ref = timm.create_model(ref_name, pretrained=False, **ref_kw, **kwargs).eval()
    return model, ref


def _outcome(fn):
    """Output shapes of ``fn()``, or the type of the error it raised."""
    try:
        with torch.no_grad():
            out = fn()
    except Exception as e:  # noqa: BLE001  (the same call must fail on both models)
        return type(e)
    return [t.shape for t in out] if isinstance(out, (list, tuple)) else out.shape


def _layer_norm(x, weight, bias, eps=1e-6):
    """LayerNorm over the last dim, written out (float64)."""
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight.double() + bias.double()


def _pool(f, pool):
    """Global pooling of ``(N, C, H, W)`` written out."""
    avg, mx = f.mean((-2, -1)), f.amax((-2, -1))
    return {'avg': avg, 'fast': avg, 'max': mx, 'avgmax': (avg + mx) / 2}[pool]


def _hook_outputs(model, x, indices):
    """Outputs of the ``feature_info`` modules ``indices``, captured by forward hooks
    during a plain forward."""
    outs = {}
    handles = [model.get_submodule(model.feature_info[i]['module']).register_forward_hook(
        lambda m, a, y, i=i: outs.__setitem__(i, y)) for i in indices]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [outs[i] for i in indices]


def _absolute(indices, n):
    """timm's meaning of ``indices`` over ``n`` features, written out."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):  # the last n
        return list(range(n - indices, n))
    return [i % n for i in indices]


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax', 'fast', ''])
@pytest.mark.parametrize('num_classes', [0, 10])
def test_global_pool_like_timm(case, pool, num_classes):
    model, ref = _pair(case, global_pool=pool, num_classes=num_classes)
    for call in (lambda m: m(X), lambda m: m.forward_head(m.forward_features(X), True)):
        assert _outcome(lambda: call(model)) == _outcome(lambda: call(ref))
    assert (model.num_features, model.head_hidden_size) == (ref.num_features,
                                                            ref.head_hidden_size)


@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax', 'fast', ''])
def test_convnext_head_values(pool):
    torch.manual_seed(0)
    model = timm.create_model('convnext_dcls_tiny', global_pool=pool, **TINY).eval()
    with torch.no_grad():
        f = model.forward_features(X)
        out, pre = model(X), model.forward_head(f, pre_logits=True)
    w, b = model.norm.weight, model.norm.bias
    hw, hb = model.head.weight.double(), model.head.bias.double()
    if pool:
        normed = _layer_norm(_pool(f, pool), w, b)
        expected = normed @ hw.T + hb
    else:  # no pooling: norm and head on every pixel, channels first
        normed = _layer_norm(f.permute(0, 2, 3, 1), w, b)
        expected = (normed @ hw.T + hb).permute(0, 3, 1, 2)
        normed = normed.permute(0, 3, 1, 2)
    torch.testing.assert_close(pre, normed.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('pool', ['catavgmax', 'median'])
def test_unsupported_global_pool_raises(pool):
    with pytest.raises(AssertionError):  # timm's own ConvNeXt refuses these too
        timm.create_model('convnext_tiny', global_pool=pool, depths=DEPTHS, dims=DIMS)
    with pytest.raises(ValueError, match=f"global_pool='{pool}' is not supported"):
        timm.create_model('convnext_dcls_tiny', global_pool=pool, **TINY)
    model = timm.create_model('convnext_dcls_tiny', **TINY)
    with pytest.raises(ValueError, match=f"global_pool='{pool}' is not supported"):
        model.reset_classifier(3, pool)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_reset_classifier_like_timm(case):
    model, ref = _pair(case)
    for args in [(0, ''), (7, 'max'), (0, None), (5, ''), (0, 'avg'), (3, None)]:
        model.reset_classifier(*args)
        ref.reset_classifier(*args)
        assert _outcome(lambda: model(X)) == _outcome(lambda: ref(X)), args
        assert model.num_classes == ref.num_classes == args[0]
        assert isinstance(model.get_classifier(), torch.nn.Identity) == (args[0] == 0)


def test_convnext_reset_other_drops_the_final_norm():
    model = timm.create_model('convnext_dcls_tiny', **TINY).eval()
    model.reset_classifier(0, 'avg', reset_other=True)
    with torch.no_grad():
        torch.testing.assert_close(model(X), model.forward_features(X).mean((-2, -1)))


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('indices', [None, 2, [1, 3], [-1], (0, 2)])
def test_forward_intermediates_like_timm(case, indices):
    model, ref = _pair(case)
    with torch.no_grad():
        final, inter = model.forward_intermediates(X, indices=indices)
        ref_final, ref_inter = ref.forward_intermediates(X, indices=indices)
        only = model.forward_intermediates(X, indices=indices, intermediates_only=True,
                                           stop_early=True)
        torch.testing.assert_close(final, model.forward_features(X))
    assert final.shape == ref_final.shape
    assert [t.shape for t in inter] == [t.shape for t in ref_inter]
    hooked = _hook_outputs(model, X, _absolute(indices, len(model.feature_info)))
    for got in (inter, only):
        assert len(got) == len(hooked)
        for a, b in zip(got, hooked):
            torch.testing.assert_close(a, b)


def test_convnext_forward_intermediates_refuses_other_formats():
    model = timm.create_model('convnext_dcls_tiny', **TINY)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(X, output_fmt='NHWC')


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('indices', [1, [0, 1], [1, 3], 3])
def test_prune_intermediate_layers_like_timm(case, indices):
    model, ref = _pair(case)
    full = _hook_outputs(model, X, range(len(model.feature_info)))
    kept, ref_kept = (m.prune_intermediate_layers(indices) for m in (model, ref))
    assert kept == ref_kept
    assert (model.num_features, model.head_hidden_size) == (ref.num_features,
                                                            ref.head_hidden_size)
    with torch.no_grad():
        out, ref_out = model(X), ref(X)
        inter = model.forward_intermediates(X, indices=kept, intermediates_only=True)
    assert out.shape == ref_out.shape
    # head gone: the output is the last kept stage, unnormalised
    torch.testing.assert_close(out, full[max(kept)])
    for i, t in zip(kept, inter):
        torch.testing.assert_close(t, full[i])


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 3), (-1,), 2])
def test_features_only_like_timm(case, out_indices):
    model, ref = _pair(case, features_only=True, out_indices=out_indices)
    name, kw = case[:2]
    torch.manual_seed(0)
    whole = timm.create_model(name, **kw).eval()  # the same weights, not pruned
    with torch.no_grad():
        feats, ref_feats = model(X), ref(X)
    assert len(feats) == len(ref_feats)
    assert [f.shape for f in feats] == [f.shape for f in ref_feats]
    for attr in ('channels', 'reduction', 'module_name'):
        assert getattr(model.feature_info, attr)() == getattr(ref.feature_info, attr)()
    expected = whole.forward_intermediates(X, indices=list(model.feature_info.out_indices),
                                           intermediates_only=True)
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('feature_cls', ['hook', 'fx'])
def test_features_only_hook_and_fx_equal_the_default(case, feature_cls):
    name, kw = case[:2]
    torch.manual_seed(0)
    default = timm.create_model(name, features_only=True, out_indices=(1, 2), **kw).eval()
    torch.manual_seed(0)
    other = timm.create_model(name, features_only=True, out_indices=(1, 2),
                              feature_cls=feature_cls, **kw).eval()
    assert other.feature_info.channels() == default.feature_info.channels()
    with torch.no_grad():
        got, expected = other(X), default(X)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('feature_cls', ['list', 'dict'])
def test_unsupported_feature_cls_raises(feature_cls):
    with pytest.raises(ValueError, match=f"feature_cls='{feature_cls}' is not supported"):
        timm.create_model('convnext_dcls_tiny', features_only=True, feature_cls=feature_cls,
                          **TINY)


def test_output_stride_other_than_32_raises():
    with pytest.raises(ValueError, match='output_stride=16 is not supported'):
        timm.create_model('convnext_dcls_tiny', output_stride=16, **TINY)


def test_features_only_and_headless_load_the_published_checkpoint(tmp_path):
    sd = add_classifier_head(random_backbone_state(DEPTHS, DIMS, K, DKS), DIMS)
    path = tmp_path / 'convnext_dcls_tiny_1k_224_ema.pth'
    torch.save({'model': sd}, path)
    load = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    whole = timm.create_model('convnext_dcls_tiny', **load).eval()
    feats = timm.create_model('convnext_dcls_tiny', features_only=True, **load).eval()
    headless = timm.create_model('convnext_dcls_tiny', num_classes=0, **load).eval()
    pixels = timm.create_model('convnext_dcls_tiny', num_classes=0, global_pool='',
                               **load).eval()
    torch.testing.assert_close(whole.stages[2][1].dwconv.P, sd['stages.2.1.dwconv.P'])
    with torch.no_grad():
        for a, b in zip(feats(X), whole.forward_intermediates(X, intermediates_only=True)):
            torch.testing.assert_close(a, b)
        f = whole.forward_features(X)
        torch.testing.assert_close(headless(X), whole.forward_head(f, pre_logits=True))
        expected = _layer_norm(f.permute(0, 2, 3, 1), sd['norm.weight'], sd['norm.bias'])
        torch.testing.assert_close(pixels(X), expected.permute(0, 3, 1, 2).float(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_fx_feature_extraction_equals_eager_intermediates(case):
    name, kw = case[:2]
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.1, **kw).eval()
    n = len(model.feature_info)
    take = [0, n - 2, n - 1]
    nodes = {model.feature_info[i]['module']: f'f{i}' for i in take}
    extractor = create_feature_extractor(model, return_nodes=nodes)  # torchvision's
    with torch.no_grad():
        got = extractor(X)
        eager = model.forward_intermediates(X, indices=take, intermediates_only=True)
    assert list(got) == [f'f{i}' for i in take]
    for a, b in zip(got.values(), eager):
        torch.testing.assert_close(a, b)
    # train mode (stochastic depth on): the same random draws give the same outputs
    model.train()
    extractor.train()
    torch.manual_seed(1)
    got = extractor(X)
    torch.manual_seed(1)
    eager = model.forward_intermediates(X, indices=take, intermediates_only=True)
    for a, b in zip(got.values(), eager):
        torch.testing.assert_close(a, b)
    # a plain symbolic trace: one graph node per DCLS layer, the model's outputs
    graph = torch.fx.symbolic_trace(model.eval())
    dcls_nodes = [nd for nd in graph.graph.nodes
                  if nd.op == 'call_function' and nd.target.__name__ == '_dcls_forward']
    assert len(dcls_nodes) == sum(isinstance(m, Dcls2d) for m in model.modules()) > 0
    with torch.no_grad():
        torch.testing.assert_close(graph(X), model(X))


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_torch_jit_script_refused_with_one_line_naming_the_alternatives(case):
    model = timm.create_model(case[0], **case[1])
    with pytest.raises(RuntimeError, match=r'Dcls2d cannot be compiled by torch\.jit\.script; '
                                           r'use torch\.compile, torch\.export\.export'):
        torch.jit.script(model)


def test_torch_export_of_the_classifier():
    model = timm.create_model('convnext_dcls_tiny', **TINY).eval()
    exported = torch.export.export(model, (X,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(X), model(X))


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(case):
    torch.manual_seed(0)
    model = timm.create_model(case[0], **case[1]).train()
    calls = []
    layer = [m for m in model.modules() if isinstance(m, Dcls2d)][-1]
    forward = layer.forward

    def counted(x):
        calls.append(1)
        return forward(x)

    layer.forward = counted  # (torch's checkpoint recomputes without module hooks)

    def grads():
        model.zero_grad()
        calls.clear()
        model(X).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    model.set_grad_checkpointing(True)
    cp, cp_calls = grads()
    assert (plain_calls, cp_calls) == (1, 2)  # forward, then again in the backward
    assert plain.keys() == cp.keys()
    for name in plain:
        torch.testing.assert_close(cp[name], plain[name], msg=name)
    model.set_grad_checkpointing(False)
    assert grads()[1] == 1


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('coarse', [False, True])
def test_group_matcher_groups_like_timm(case, coarse):
    model, ref = _pair(case)
    ours = group_parameters(model, model.group_matcher(coarse), reverse=True)
    theirs = group_parameters(ref, ref.group_matcher(coarse), reverse=True)
    names = case[4](model, ref)
    assert set(names.values()) == set(theirs)  # every timm weight has a DCLS counterpart
    assert {n: ours[n] for n in names} == {n: theirs[t] for n, t in names.items()}
    # the positions belong to the layer of the block that owns them
    for n in _positions(model):
        assert ours[n] == ours[n.rsplit('.', 1)[0] + '.weight']


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_layer_decay_groups_put_positions_without_weight_decay(case):
    model, _ = _pair(case)
    decay, wd = 0.7, 0.05
    positions = _positions(model)
    assert model.no_weight_decay() == positions and positions
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=wd, layer_decay=decay)
    group_of = {id(p): g for g in opt.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    for name in positions:
        weight = group_of[id(params[name.rsplit('.', 1)[0] + '.weight'])]
        assert group_of[id(params[name])]['weight_decay'] == 0.
        assert group_of[id(params[name])]['lr_scale'] == weight['lr_scale'] < 1
        assert weight['weight_decay'] == wd
    # without the model's list, timm would decay the (multi-dim) positions
    groups = param_groups_layer_decay(model, weight_decay=wd, layer_decay=decay)
    decayed = {id(p) for g in groups if g['weight_decay'] for p in g['params']}
    assert all(id(params[n]) in decayed for n in positions)


def test_convnext_layer_decay_scales_by_hand():
    model = timm.create_model('convnext_dcls_tiny', **TINY)
    decay, wd = 0.7, 0.05
    positions = model.no_weight_decay()
    assert positions == {f'stages.{i}.0.dwconv.P' for i in range(4)}  # shared per stage
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=wd, layer_decay=decay)
    group_of = {id(p): g for g in opt.param_groups for p in g['params']}
    # layer ids written out: stem 0, then block by block (a stage's downsampling with its
    # first block), the final norm and head last
    n_layers = sum(DEPTHS) + 2
    first_block = [1 + sum(DEPTHS[:i]) for i in range(4)]

    def layer(name):
        if name.startswith('downsample_layers.0.'):
            return 0
        m = re.match(r'(downsample_layers|stages)\.(\d+)\.(\d+)?', name)
        if m is None:
            return n_layers - 1
        i = int(m.group(2))
        return first_block[i] + (int(m.group(3)) if m.group(1) == 'stages' else 0)

    for name, p in model.named_parameters():
        group = group_of[id(p)]
        assert group['lr_scale'] == pytest.approx(decay ** (n_layers - 1 - layer(name))), name
        no_decay = p.ndim <= 1 or name in positions
        assert group['weight_decay'] == (0. if no_decay else wd), name


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_pretrained_cfg_complete_and_round_trips(case):
    model, ref = _pair(case)
    cfg = model.pretrained_cfg
    # every field timm's model fills, but the provenance of timm's hosted weights
    assert set(ref.pretrained_cfg) - {'hf_hub_id', 'tag', 'license', 'origin_url'} <= set(cfg)
    assert model.default_cfg == cfg and cfg['architecture'] == case[0]
    assert cfg['first_conv'] + '.weight' in model.state_dict()
    assert cfg['classifier'] + '.weight' in model.state_dict()
    data = timm.data.resolve_model_data_config(model)
    assert (data['input_size'], data['crop_pct']) == (cfg['input_size'], cfg['crop_pct'])
    transform = timm.data.create_transform(**data)
    assert transform(Image.new('RGB', (300, 260))).shape == cfg['input_size']
    again = timm.create_model(case[0], pretrained_cfg=cfg, **case[1])
    assert again.pretrained_cfg == cfg
    feats = timm.create_model(case[0], features_only=True, **case[1])
    assert feats.pretrained_cfg['input_size'] == cfg['input_size']
    assert 'classifier' not in feats.pretrained_cfg  # timm drops it for feature models


def test_convnext_pretrained_cfg_is_the_published_evaluation():
    cfg = timm.create_model('convnext_dcls_tiny', **TINY).pretrained_cfg
    ref = timm.create_model('convnext_tiny', depths=DEPTHS, dims=DIMS).pretrained_cfg
    assert set(ref) - {'hf_hub_id'} <= set(cfg)  # with the published weights' provenance
    assert (cfg['tag'], cfg['license']) == ('in1k', 'mit')
    assert cfg['test_input_size'] == cfg['input_size'] == (3, 224, 224)
    assert cfg['test_crop_pct'] == cfg['crop_pct'] == 0.875
    assert cfg['interpolation'] == 'bicubic'


@pytest.mark.parametrize('name', ['convnext_dcls_small', 'convnext_dcls_base'])
def test_every_convnext_factory_takes_the_api(name):
    """The other factories build the same class: the calls above on one tiny arch."""
    torch.manual_seed(0)
    feats = timm.create_model(name, features_only=True, out_indices=(1, 3), **TINY).eval()
    torch.manual_seed(0)
    pixels = timm.create_model(name, num_classes=4, global_pool='', **TINY).eval()
    torch.manual_seed(0)
    ref = timm.create_model('convnext_dcls_tiny', num_classes=4, global_pool='', **TINY).eval()
    assert feats.feature_info.channels() == [DIMS[1], DIMS[3]]
    assert feats.pretrained_cfg['architecture'] == name
    with torch.no_grad():
        assert [f.shape for f in feats(X)] == [(2, DIMS[1], 8, 8), (2, DIMS[3], 2, 2)]
        torch.testing.assert_close(pixels(X), ref(X))
    assert pixels.group_matcher() == ref.group_matcher()
    assert pixels.no_weight_decay() == ref.no_weight_decay()
