"""The analysis benchmarks run end to end and write what they print (tiny settings: these
tests check the scripts' logic and output format, never speed)."""
import json
import os
import shutil

import pytest
import torch

from dcls_mm.ops import extension
from tests._helpers import load_tool


@pytest.fixture(scope='module')
def bench():
    return load_tool('tools/analysis/benchmark_convnext_dcls.py')


@pytest.fixture(params=['as built', 'no compiler'])
def compiled(request, monkeypatch, tmp_path):
    """Whether the C++ kernels are used: as the set-up left them, and as on a machine
    where the set-up found no C++ compiler (README: supported, with the PyTorch
    fallback). The latter is the real fallback path: an empty library folder, and the
    module's load state reset so that it looks there again."""
    if request.param == 'no compiler':
        monkeypatch.setenv('DCLS_MM_EXT_DIR', str(tmp_path / 'no-kernels'))
        monkeypatch.setitem(extension._state, 'loaded', None)
        monkeypatch.setitem(extension._state, 'isa', None)
        assert not extension.available()
    elif shutil.which(os.environ.get('CXX', 'c++')):
        assert extension.available(), 'a C++ compiler is here, but the set-up built no kernels'
    return extension.available()


def test_layer_part_writes_json(bench, compiled, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    results = bench.main(['--only', 'layer', '--skip-plain', '--repeats', '1', '--batch', '1',
                          '--interpolations', 'bilinear', 'gaussian', '--out', str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(results))
    assert written['compiled_kernels'] is compiled
    assert written['compiled_isa'] == (extension.isa() if compiled else 'not built')
    assert written['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    rows = written['layer']
    assert [(r['interpolation'], r['positions'], r['dks'], r['K'], r['C'], r['H'], r['layout'])
            for r in rows] == [
        (interp, positions, *bench.VARIANTS[interp], c, h, 'channels_last')
        for interp in ('bilinear', 'gaussian') for positions in ('spread', 'init')
        for c, h in bench.STAGES]
    for row in rows:
        # spread positions reach the whole kernel (on the 7x7 map: the 13x13 taps that
        # meet it, dks 17: 2 * 7 - 1 = 13); initial ones (N(0, 0.5)) a square near the
        # centre, smaller than the kernel on the maps larger than it
        side = min(row['dks'], 2 * row['H'] - 1)
        if row['positions'] == 'spread':
            assert row['kernel'] == [side, side]
        else:
            assert row['kernel'][0] == row['kernel'][1] <= side
            assert row['kernel'][0] < side or row['H'] == 7
    # without the C++ kernels FFT is the only kernel-gradient route and the gaussian
    # kernel is built by the einsum
    grad_routes = ('direct', 'fft', 'sparse') if compiled else ('fft (only one available)', )
    for row in rows:
        assert row['dense7_ms'] > 0 and row['dcls_ms'] > 0 and 'plain_ms' not in row
        assert row['construct_share'] == pytest.approx(row['construct_ms'] / row['conv_ms'])
        assert row['routes']['kernel_grad'] in grad_routes
        assert row['routes']['conv'] in (('direct', 'onednn', 'sparse') if compiled else
                                         ('onednn (only one available)', ))
        assert row['routes']['construct'] == (
            'compiled' if compiled else
            'scatter' if row['interpolation'] == 'bilinear' else 'torch')
    printed = capsys.readouterr().out
    assert f'cpu_capability={torch.backends.cpu.get_cpu_capability()}' in printed
    assert ('compiled C++ kernels' if compiled else
            'PyTorch fallback (C++ kernels not built)') in printed
    assert printed.count('x ') >= len(rows)  # one ratio per row
    assert printed.count('kernel_grad ') == len(rows)
    for row in rows:  # the taps convolved, on each row's line
        assert f' {row["kernel"][0]}x{row["kernel"][1]}  conv ' in printed
    for route in ('compiled', 'scatter', 'torch'):
        assert printed.count(f'construct {route}') == sum(
            r['routes']['construct'] == route for r in rows)


@pytest.mark.slow  # full-size ConvNeXt-T models, dense and dcls
def test_throughput_runs_on_any_device(bench):
    result = bench.throughput('cpu', ('bilinear', 'gaussian'), batch=1, repeats=1, plain=True)
    assert result['batch'] == 1
    ips = result['images_per_s']
    assert list(ips) == ['convnext_tiny', 'convnext_dcls_tiny_bilinear',
                         'convnext_dcls_tiny_bilinear_plain', 'convnext_dcls_tiny_gaussian',
                         'convnext_dcls_tiny_gaussian_plain']
    assert all(v > 0 for v in ips.values())
    for name, ratio in result['ratios'].items():
        assert ratio == pytest.approx(ips[name] / ips['convnext_tiny'])


@pytest.fixture(scope='module')
def downstream():
    return load_tool('tools/analysis/benchmark_downstream.py')


def test_downstream_detection_inputs_have_the_real_size(downstream):
    batch = downstream.make_batch('detection')
    (image,), (sample,) = batch['inputs'], batch['data_samples']
    assert image.shape == (3, 800, 1333) and image.dtype == torch.uint8
    gt = sample.gt_instances
    assert len(gt) == 10 and gt.bboxes.shape == (10, 4) and int(gt.labels.max()) < 80
    assert gt.masks.masks.shape == (10, 800, 1333)
    seg = downstream.make_batch('segmentation')
    assert [tuple(i.shape) for i in seg['inputs']] == [(3, 512, 512)] * 2
    assert all(s.gt_sem_seg.data.shape == (1, 512, 512) for s in seg['data_samples'])


@pytest.mark.slow  # ConvNeXt-T UperNets from the recipe configs
def test_downstream_segmentation_runs_and_reports_routes(downstream, tmp_path, capsys):
    """UperNet from the recipe configs, ConvNeXt-T vs ConvNeXt-T-dcls, at a tiny size."""
    out = tmp_path / 'downstream.json'
    results = downstream.main(['--tasks', 'segmentation', '--image-size', '64', '64',
                               '--repeats', '1', '--warmup', '0', '--skip-memory',
                               '--out', str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(results))
    seg = written['segmentation']
    assert seg['size'] == [64, 64] and seg['batch'] == 2
    assert set(seg['models']) == {'convnext_t', 'convnext_dcls_t_bilinear'}
    base, dcls = seg['models']['convnext_t'], seg['models']['convnext_dcls_t_bilinear']
    assert seg['ratios']['convnext_dcls_t_bilinear']['train'] == pytest.approx(
        dcls['train_ms'] / base['train_ms'])
    routes = dcls['routes']
    assert len(routes) == 18  # ConvNeXt-T: 3 + 3 + 9 + 3 DCLS depthwise convs
    assert routes['backbone.stages.0.0.dwconv']['input'] == [2, 96, 16, 16]
    grad_routes = (('direct', 'fft', 'sparse') if extension.available() else
                   ('fft (only one available)', ))
    construct = 'compiled' if extension.available() else 'scatter'
    assert all(r['kernel_grad'] in grad_routes and r['construct'] == construct
               for r in routes.values())
    printed = capsys.readouterr().out
    assert f'cpu_capability={torch.backends.cpu.get_cpu_capability()}' in printed
    assert 'routes convnext_dcls_t_bilinear: 3 x 96x16x16: conv ' in printed
    conv_routes = ('direct', 'onednn', 'sparse') if extension.available() else (
        'onednn (only one available)', )
    assert all(r['conv'] in conv_routes for r in routes.values())
